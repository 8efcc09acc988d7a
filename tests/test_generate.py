"""Generation with the KV cache equals recomputing the full sequence, padding changes nothing, sampling is seeded;
equal-length batches skip masks, and the fused block decodes the same."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from tiny import fused_pair

from phi_train.config import model_config
from phi_train.generate import (
    GenerateError,
    cut_at_stop,
    generate,
    generate_ids,
    prefill_inputs,
    row_seed,
    sample_next,
)
from phi_train.model import PhiModel

torch.set_num_threads(1)
VOCAB = 120  # not a multiple of 64: the padded rows 120..127 must never be emitted


def tiny_model(seed: int = 0, vocab: int = VOCAB) -> PhiModel:
    # init_std 0.2 (not 0.02): well-separated logits, so argmax is not decided by float rounding between code paths
    cfg = model_config(
        preset="phi1_tiny", n_layer=2, d_model=128, n_head=2, d_mlp=256, vocab_size=vocab, max_seq_len=96, init_std=0.2
    )
    torch.manual_seed(seed)
    return PhiModel(cfg).eval()


def reference_greedy(model: PhiModel, prompt: list[int], n: int, vocab: int) -> tuple[list[int], float]:
    """No cache, no padding: run the whole sequence again for every new token. Returns ids and the smallest top-2 gap."""
    seq, gap = list(prompt), float("inf")
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))[0, -1, :vocab]
            top = logits.topk(2).values
            gap = min(gap, float(top[0] - top[1]))
            seq.append(int(logits.argmax()))
    return seq[len(prompt) :], gap


PROMPTS = [[5, 17, 3], [9] * 11, [44], [1, 2, 3, 4, 5, 6, 7], [100, 7, 7, 80, 2, 63]]


def test_cached_greedy_equals_full_recompute_for_a_padded_batch():
    model = tiny_model()
    n = 20
    expected = []
    for p in PROMPTS:
        ids, gap = reference_greedy(model, p, n, VOCAB)
        assert gap > 1e-3, "test model too close to a tie for an exact comparison"
        expected.append(ids)
    got = generate_ids(model, PROMPTS, max_new_tokens=n, vocab_size=VOCAB, batch_size=16)
    assert got == expected
    # each prompt alone (no padding at all) gives the same, and so do small batches (different padding partners)
    assert [generate_ids(model, [p], max_new_tokens=n, vocab_size=VOCAB)[0] for p in PROMPTS] == expected
    assert generate_ids(model, PROMPTS, max_new_tokens=n, vocab_size=VOCAB, batch_size=2) == expected
    assert all(t < VOCAB for ids in got for t in ids)


def test_rows_finishing_at_eos_leave_the_batch_and_the_rest_are_unchanged():
    model = tiny_model()
    n = 20
    full = [reference_greedy(model, p, n, VOCAB)[0] for p in PROMPTS]
    eos = full[0][3]  # a token prompt 0 emits at step 3: that row stops early, others stop wherever it shows up
    expected = [ids[: ids.index(eos)] if eos in ids else ids for ids in full]
    assert len({len(e) for e in expected}) > 1, "rows should finish at different steps"
    batch_sizes: list[int] = []
    hook = model.wte.register_forward_hook(lambda m, inp, out: batch_sizes.append(inp[0].shape[0]))
    got = generate_ids(model, PROMPTS, max_new_tokens=n, eos_id=eos, vocab_size=VOCAB)
    hook.remove()
    assert got == expected
    assert batch_sizes[0] == len(PROMPTS) and min(batch_sizes) < len(PROMPTS)  # the batch shrank as rows finished
    assert batch_sizes == sorted(batch_sizes, reverse=True)
    # one forward per token of the longest row (its EOS included), none for a token that ends at max_new_tokens
    assert len(batch_sizes) == min(n, 1 + max(len(e) for e in expected))


def test_prefill_mask_hides_padding_and_keeps_pad_queries_finite():
    ids, positions, pad, mask = prefill_inputs([[1, 2, 3], [4]], pad_id=0, device="cpu")
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert pad.tolist() == [0, 2]
    m = mask[:, 0]
    assert m[0].tolist() == torch.ones(3, 3, dtype=torch.bool).tril().tolist()
    assert m[1, 2].tolist() == [False, False, True]  # the real token sees only itself, never the padding
    assert all(m[1, i].any() for i in range(3))  # every padding query sees at least one key: no NaN from SDPA


def test_sampling_is_reproducible_and_independent_of_batch_company():
    model = tiny_model()
    kw = {"max_new_tokens": 15, "vocab_size": VOCAB, "temperature": 1.0, "top_p": 0.9}
    a = generate_ids(model, PROMPTS, seed=7, **kw)
    assert a == generate_ids(model, PROMPTS, seed=7, **kw)
    assert a != generate_ids(model, PROMPTS, seed=8, **kw)
    assert a != generate_ids(model, PROMPTS, **{**kw, "temperature": 0.0})
    # prompt i draws from its own generator (row_seed(7, i)), whatever else is in its batch
    assert generate_ids(model, PROMPTS, seed=7, batch_size=2, **kw) == a
    # the same prompt twice gets two different samples (pass@k needs that)
    twice = generate_ids(model, [PROMPTS[0], PROMPTS[0]], seed=7, **kw)
    assert twice[0] == a[0] and twice[1] != twice[0]


def test_per_prompt_seeds_are_the_rows_streams_and_never_seed_plus_index():
    """The old scheme seeded row i with seed + i, so a batch seeded 1 replayed rows 1.. of a batch seeded 0 shifted by
    one. Now the pair is mixed, and an explicit per-prompt seed fixes a row's sample wherever it sits."""
    model = tiny_model()
    kw = {"max_new_tokens": 12, "vocab_size": VOCAB, "temperature": 1.0}
    same = [PROMPTS[0]] * 6
    zero, one = generate_ids(model, same, seed=0, **kw), generate_ids(model, same, seed=1, **kw)
    assert all(one[i] != zero[i + 1] for i in range(5))
    assert len({tuple(x) for x in zero}) == 6  # six samples of one prompt: six different texts
    seeds = {(s, i): row_seed(s, i) for s in range(50) for i in range(50)}
    assert len(set(seeds.values())) == len(seeds) and all(0 <= v < 2**63 for v in seeds.values())
    # an explicit seed travels with its prompt: reordering the batch (and its company) does not change its sample
    mine = generate_ids(model, [PROMPTS[1], PROMPTS[2], PROMPTS[3]], seeds=[11, 22, 33], batch_size=2, **kw)
    moved = generate_ids(model, [PROMPTS[3], PROMPTS[0], PROMPTS[1]], seeds=[33, 5, 11], batch_size=3, **kw)
    assert moved[0] == mine[2] and moved[2] == mine[0]
    for bad, msg in (([1], "2 prompts"), ([1, -2], "non-negative"), ([1, 2.5], "non-negative")):
        with pytest.raises(GenerateError, match=msg):
            generate_ids(model, PROMPTS[:2], seeds=bad, **kw)


def test_finish_reasons_say_why_each_row_ended(tokenizer):
    model = tiny_model(seed=3, vocab=tokenizer.vocab_size)
    prompts = ["def add(a, b):\n", "class Point:\n    def", "x"]
    free = generate(model, tokenizer, prompts, max_new_tokens=6)
    reasons: dict[int, str] = {}
    generate(model, tokenizer, prompts, max_new_tokens=6, on_finish=lambda i, r: reasons.__setitem__(i, r))
    assert reasons == {0: "length", 1: "length", 2: "length"} and all(free)
    stop = free[0][2:4]
    reasons.clear()
    generate(model, tokenizer, prompts[:1], max_new_tokens=6, stop=[stop], on_finish=reasons.__setitem__)
    assert reasons == {0: "stop"}
    reasons.clear()
    generate(model, tokenizer, prompts, max_new_tokens=6, cancelled=lambda i: i == 2, on_finish=reasons.__setitem__)
    assert reasons == {0: "length", 1: "length", 2: "cancelled"}
    # the context (max_seq_len 96) ends a row before max_new_tokens does: that is a length cut too
    reasons.clear()
    long = " ".join(["x = 1"] * 200)
    generate(model, tokenizer, [long], max_new_tokens=40, on_finish=reasons.__setitem__)
    assert reasons == {0: "length"}


def test_nucleus_keeps_only_the_top_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gens = [torch.Generator().manual_seed(0)]
    draws = {int(sample_next(logits, 1.0, 0.7, gens)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.7 so the nucleus is {0, 1}
    assert {int(sample_next(logits, 1.0, 0.4, gens)) for _ in range(50)} == {0}  # most likely token always kept
    assert {int(sample_next(logits, 1.0, 1.0, gens)) for _ in range(500)} == {0, 1, 2, 3}
    assert int(sample_next(logits, 0.0, 1.0, None)) == 0


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from data_tools.tokenizer import train_tokenizer
    from phi_train.tokenizer import Tokenizer

    texts = [
        "def add(a, b):\n    return a + b\n",
        "for i in range(10):\n    print(i * 2)\n",
        "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
        "if x > 0:\n    y = x\nelse:\n    y = -x\n",
    ] * 40
    path = train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=320, num_threads=1)
    return Tokenizer(path)


def test_text_generation_cuts_at_stop_strings_and_stops_early(tokenizer):
    model = tiny_model(seed=3, vocab=tokenizer.vocab_size)
    prompts = ["def add(a, b):\n", "class Point:\n    def", "x"]
    free = generate(model, tokenizer, prompts, max_new_tokens=40)
    assert all(isinstance(t, str) for t in free) and all(free)
    # the text equals decoding the generated ids after the prompt
    ids = generate_ids(
        model,
        [tokenizer.encode(p) for p in prompts],
        max_new_tokens=40,
        eos_id=tokenizer.eos_id,
        vocab_size=tokenizer.vocab_size,
    )
    assert free == [tokenizer.decode(tokenizer.encode(p) + i)[len(p) :] for p, i in zip(prompts, ids)]
    # a stop string taken from the middle of the first completion: output cut right before it, and decoding stops there
    text = free[0]
    stop = text[len(text) // 3 : len(text) // 3 + 3]
    calls: list[int] = []
    hook = model.wte.register_forward_hook(lambda m, inp, out: calls.append(1))
    [cut] = generate(model, tokenizer, [prompts[0]], max_new_tokens=40, stop=[stop, "@@never@@"])
    hook.remove()
    assert cut == text[: text.index(stop)]
    assert len(calls) < 1 + 40
    assert generate(model, tokenizer, prompts, max_new_tokens=40, stop=[stop])[1:] == [
        cut_at_stop(t, [stop]) for t in free[1:]
    ]


def test_streamed_pieces_concatenate_to_the_returned_text(tokenizer):
    model = tiny_model(seed=3, vocab=tokenizer.vocab_size)
    prompts = ["def add(a, b):\n", "class Point:\n    def", "x", "for i in"]
    free = generate(model, tokenizer, prompts, max_new_tokens=40)
    stop = free[0][len(free[0]) // 2 : len(free[0]) // 2 + 2]  # a stop that does occur, mid-way through prompt 0
    for stops in ([], [stop, "@@never@@"]):
        pieces: dict[int, list[str]] = {i: [] for i in range(len(prompts))}
        texts = generate(
            model, tokenizer, prompts, max_new_tokens=40, stop=stops, batch_size=3,
            on_text=lambda i, delta, pieces=pieces: pieces[i].append(delta),
        )  # fmt: skip
        assert texts == generate(model, tokenizer, prompts, max_new_tokens=40, stop=stops, batch_size=3)
        for i, text in enumerate(texts):
            assert "".join(pieces[i]) == text
            assert all(pieces[i])  # no empty pieces; nothing sent is ever taken back (the join equals the cut text)
        assert max(len(p) for p in pieces.values()) > 3  # pieces arrive while decoding, not once at the end


def test_cancelled_rows_stop_at_their_next_token_and_the_others_are_unchanged(tokenizer):
    model = tiny_model(seed=3, vocab=tokenizer.vocab_size)
    prompts = ["def add(a, b):\n", "class Point:\n    def", "x"]
    free = generate_ids(
        model, [tokenizer.encode(p) for p in prompts], max_new_tokens=30, eos_id=tokenizer.eos_id,
        vocab_size=tokenizer.vocab_size,
    )  # fmt: skip
    assert all(len(ids) > 2 for ids in free)
    streamed: dict[int, list[str]] = {0: [], 1: [], 2: []}
    texts = generate(
        model, tokenizer, prompts, max_new_tokens=30, cancelled=lambda i: i == 1,
        on_text=lambda i, d: streamed[i].append(d),
    )  # fmt: skip
    assert texts[0] == generate(model, tokenizer, prompts[:1], max_new_tokens=30)[0]
    assert texts[1] == tokenizer.decode(tokenizer.encode(prompts[1]) + free[1][:1])[len(prompts[1]) :]  # one token
    assert all("".join(streamed[i]) == texts[i] for i in range(3))


def test_fixed_length_decodes_every_step_and_returns_the_same_text(tokenizer):
    """The mode of the trainer's end-of-run sample (ZeRO-3 ranks must run the same forwards): same text as stopping
    early, but always max_new_tokens forward passes."""
    model = tiny_model(seed=3, vocab=tokenizer.vocab_size)
    prompts = ["def add(a, b):\n", "class Point:\n    def"]
    free = generate(model, tokenizer, prompts, max_new_tokens=30)
    stop = free[0][len(free[0]) // 3 : len(free[0]) // 3 + 3]
    calls: list[int] = []
    hook = model.wte.register_forward_hook(lambda m, inp, out: calls.append(1))
    fixed = generate(model, tokenizer, prompts, max_new_tokens=30, stop=[stop], fixed_length=True)
    hook.remove()
    assert fixed == generate(model, tokenizer, prompts, max_new_tokens=30, stop=[stop])
    assert len(calls) == 30  # prefill + 29 decode steps, although prompt 0 hit its stop string early
    with pytest.raises(GenerateError, match="cannot stream"):
        generate(model, tokenizer, prompts, fixed_length=True, on_text=lambda i, d: None)


def test_stop_prefix_is_held_back():
    from phi_train.generate import _stop_prefix_len

    assert _stop_prefix_len("abc\nde", ["\ndef"]) == 3
    assert _stop_prefix_len("abc\n", ["\ndef", "\n#"]) == 1
    assert _stop_prefix_len("abc", ["\ndef"]) == 0
    assert _stop_prefix_len("x\nde", ["\nde"]) == 0  # a whole stop is cut, not held back


def test_empty_prompt_starts_from_eos_and_bad_arguments_are_one_line_errors(tokenizer):
    model = tiny_model(seed=3, vocab=tokenizer.vocab_size)
    assert isinstance(generate(model, tokenizer, [""], max_new_tokens=5)[0], str)
    for kw, word in [
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
        ({"temperature": -1.0}, "temperature=-1.0"),
        ({"top_p": 0.0}, "top_p=0.0"),
        ({"batch_size": 0}, "batch_size=0"),
    ]:
        with pytest.raises(GenerateError, match=word) as err:
            generate(model, tokenizer, ["x"], **kw)
        assert "\n" not in str(err.value)
    with pytest.raises(GenerateError, match="single string"):
        generate(model, tokenizer, "def f():")


def test_cut_at_stop_takes_the_earliest():
    assert cut_at_stop("a\ndef b\nclass c", ["\nclass", "\ndef"]) == "a"
    assert cut_at_stop("abc", []) == "abc"
    assert cut_at_stop("abc", [""]) == "abc"


def test_sequences_stay_inside_the_context():
    model = tiny_model()  # max_seq_len 96
    long = list(range(1, 100))  # 99 tokens > 96 - 10 new tokens: the last 86 are kept
    [a] = generate_ids(model, [long], max_new_tokens=10, vocab_size=VOCAB)
    [b] = generate_ids(model, [long[-86:]], max_new_tokens=10, vocab_size=VOCAB)
    assert a == b and len(a) == 10
    # more new tokens than the context holds: the prompt keeps half the context, each row stops when it is full
    short, mid = [3, 4], list(range(1, 40))
    out = generate_ids(model, [short, mid, long], max_new_tokens=500, vocab_size=VOCAB)
    assert [len(o) for o in out] == [96 - 2, 96 - 39, 96 - 48]
    assert out[2] == generate_ids(model, [long[-48:]], max_new_tokens=500, vocab_size=VOCAB)[0]


def test_equal_length_batch_takes_the_mask_free_path_with_the_same_tokens():
    model = tiny_model()
    calls = []
    model.register_forward_pre_hook(
        lambda mod, args, kw: calls.append((kw.get("attn_mask") is None, kw.get("positions") is None)), with_kwargs=True
    )
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [1, 2, 3, 4, 5]]
    together = generate_ids(model, prompts, max_new_tokens=12, batch_size=3)
    assert calls and all(no_mask and no_positions for no_mask, no_positions in calls)  # prefill and every step
    alone = [generate_ids(model, [p], max_new_tokens=12, batch_size=1)[0] for p in prompts]
    calls.clear()
    padded = generate_ids(model, prompts + [[7]], max_new_tokens=12, batch_size=4)[:3]
    assert calls and not any(no_mask for no_mask, _ in calls)  # a padded row: the masked path
    assert together == alone == padded
    assert [len(t) for t in together] == [12, 12, 12]


def test_kv_cache_generation_with_the_fused_block(tokenizer):
    plain, fused = fused_pair(seed=11)
    prompts = [[5, 17, 200, 3, 9, 44], [7], [100, 101, 102]]  # different lengths: left padding and masks
    got = generate_ids(fused, prompts, max_new_tokens=12, batch_size=3)
    assert got == generate_ids(plain, prompts, max_new_tokens=12, batch_size=3)
    assert [len(g) for g in got] == [12, 12, 12]
    # the cache gives what greedy decoding by full recomputation gives
    for prompt, new in zip(prompts, got):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                seq.append(int(fused(torch.tensor([seq]))[0, -1].argmax()))
        assert seq[len(prompt) :] == new
    # sampling and text generation run through the fused path too
    kw = dict(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=1)
    texts = generate(fused, tokenizer, ["def add(", "for i in"], **kw)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert texts == generate(fused, tokenizer, ["def add(", "for i in"], **kw)
