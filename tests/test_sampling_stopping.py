"""Sampling and stopping: seeded sampling is reproducible whatever the batch; text never leaks a stop sequence."""
import asyncio
import json
import random
import time

import pytest
import torch

from clients.client import AsyncClient, Client
from loader.default_model import build_tokenizer
from protos.loraplex.v1 import inference_pb2 as pb
from server.sampling import SamplingParams, make_generator, sample
from server.stopping import FinishReason, StopMatcher, StoppingParams, TextStream
from tests.helpers import start_server


def test_greedy_and_degenerate_sampling_equal_argmax():
    logits = torch.randn(4, 50)
    greedy = sample(logits, [SamplingParams()] * 4, [None] * 4)
    assert greedy == logits.argmax(-1).tolist()
    top1 = [SamplingParams(temperature=1.0, top_k=1, seed=i) for i in range(4)]
    assert sample(logits, top1, [make_generator(p) for p in top1]) == greedy
    tiny_p = [SamplingParams(temperature=1.0, top_p=1e-6, seed=i) for i in range(4)]
    assert sample(logits, tiny_p, [make_generator(p) for p in tiny_p]) == greedy
    # the smallest float32 temperature: greedy in the limit, not an overflowed softmax (found by tests/test_fuzz.py)
    tiny_t = [SamplingParams(temperature=1e-45, seed=i) for i in range(4)]
    assert sample(logits * 100, tiny_t, [make_generator(p) for p in tiny_t]) == greedy


def test_top_k_only_draws_from_the_k_best():
    logits = torch.randn(1, 100)
    best = set(logits[0].topk(5).indices.tolist())
    params = SamplingParams(temperature=2.0, top_k=5, seed=7)
    g = make_generator(params)
    assert all(sample(logits, [params], [g])[0] in best for _ in range(200))


def _frequencies(logits_row, params, n=20000):
    """How often each token is drawn by `n` rows of these logits, row i seeded with i (one batch)."""
    rows = [SamplingParams(params.temperature, params.top_k, params.top_p, seed=i) for i in range(n)]
    tokens = sample(logits_row.expand(n, -1), rows, [make_generator(q) for q in rows])
    return torch.bincount(torch.tensor(tokens), minlength=logits_row.shape[-1]) / n


def _exact(logits_row, temperature, keep):
    probs = (logits_row / temperature).softmax(-1) * keep
    return probs / probs.sum()


def test_sampled_tokens_follow_the_filtered_distribution():
    """Temperature, top-k and top-p draw with the probabilities they define (20000 draws: every frequency within
    0.015 of its probability, > 4 standard deviations), never a token they filter out."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    # softmax: 0.405 0.245 0.149 0.090 0.055 ...; the mass before the 3rd token is 0.650, before the 4th 0.799,
    # before the 5th 0.889: top_p 0.7 keeps three tokens, 0.8 four. After top_k 3 (0.507 0.307 0.186), the mass
    # before the 3rd is 0.814: top_p 0.75 keeps two.
    cases = [(SamplingParams(temperature=1.0), logits > -9), (SamplingParams(temperature=2.5), logits > -9),
             (SamplingParams(temperature=0.5, top_k=3), logits >= 1.0),
             (SamplingParams(temperature=1.0, top_p=0.7), logits >= 1.0),
             (SamplingParams(temperature=1.0, top_p=0.8), logits >= 0.5),
             (SamplingParams(temperature=1.0, top_k=3, top_p=0.75), logits >= 1.5)]
    for params, keep in cases:
        want = _exact(logits, params.temperature, keep)
        got = _frequencies(logits, params)
        assert (got - want).abs().max() < 0.015, (params, got, want)
        assert got[~keep].sum() == 0, params


def test_a_token_of_probability_zero_from_a_devices_scan_is_drawn_again_on_the_host(monkeypatch):
    """A GPU's parallel cumulative sum can round a filtered token's running sum above its predecessor's: the drawn
    token is checked, and such a row drawn again with sums that run in order."""
    from server import sampling
    invert, calls = sampling._invert, []

    def scan_that_lands_on_a_zero(probs, u):
        calls.append(len(probs))
        if len(calls) == 1:  # as a device's rounding would: the row's first filtered-out token
            return (probs == 0).float().argmax(-1)
        return invert(probs, u)
    monkeypatch.setattr(sampling, "_invert", scan_that_lands_on_a_zero)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    params = [SamplingParams(temperature=1.0, top_k=2, seed=3)]
    token = sample(logits, params, [make_generator(params[0])])[0]
    assert calls == [1, 1] and token in (0, 1)


def test_a_seeded_row_draws_the_same_tokens_in_any_batch():
    """Alone, with greedy rows, with sampled rows of every filter, first or last, in batches of 1 to 9 rows: the
    same seed and logits give the same tokens (the draws are vectorised; each row's arithmetic is its own)."""
    vocab = 4096
    ranks = torch.arange(1, vocab + 1, dtype=torch.float32)
    torch.manual_seed(0)
    row = -1.1 * ranks.log()[torch.randperm(vocab)]  # a real model's shape: a few likely tokens, a long tail
    for params in [SamplingParams(0.8, 0, 1.0, 11), SamplingParams(0.8, 0, 0.9, 12), SamplingParams(1.2, 40, 0.95, 13)]:
        def draws(others, first=True):
            rows = [params, *others] if first else [*others, params]
            logits = torch.cat([row[None], torch.randn(len(others), vocab) * 4]) if first else \
                torch.cat([torch.randn(len(others), vocab) * 4, row[None]])
            generators = [make_generator(q) for q in rows]
            return [sample(logits, rows, generators)[0 if first else -1] for _ in range(20)]
        alone = draws([])
        assert len(set(alone)) > 1  # really sampled
        flat = [SamplingParams(1.0, 0, 0.999, s) for s in range(8)]  # needs the whole vocabulary sorted
        assert draws([SamplingParams(), SamplingParams(0.5, 5, 1.0, 1)]) == alone
        assert draws(flat, first=False) == alone
        assert draws([SamplingParams()] * 4, first=False) == alone


def test_a_wide_nucleus_sorts_its_own_row_not_the_batch(monkeypatch):
    """A row whose top-p nucleus spans the vocabulary needs it sorted; the rows beside it, whose nucleus lies in
    the first few tokens, are cut from those alone (the search widens per row), and cut as they are alone."""
    vocab = 4096
    ranks = torch.arange(1, vocab + 1, dtype=torch.float32)
    logits = torch.stack([-3.0 * ranks.log()] * 7 + [torch.zeros(vocab)])  # 7 peaked rows, then a flat one
    params = [SamplingParams(1.0, 0, 0.9, seed) for seed in range(8)]
    alone = [sample(logits[i:i + 1], params[i:i + 1], [make_generator(params[i])])[0] for i in range(8)]
    searched, topk = [], torch.Tensor.topk
    monkeypatch.setattr(torch.Tensor, "topk", lambda t, k, **kw: (searched.append((len(t), k)), topk(t, k, **kw))[1])
    assert sample(logits, params, [make_generator(p) for p in params]) == alone
    assert searched == [(8, 64), (1, 512), (1, 4096)]


def _stream(stop=(), max_new=50):
    tokenizer = build_tokenizer()
    return tokenizer, TextStream(tokenizer, StoppingParams(max_new, tuple(stop)), frozenset({2}))


def test_stop_sequence_is_never_streamed():
    tokenizer, stream = _stream(stop=["END"])
    shown = ""
    for token in tokenizer("abc ENx EN").input_ids + tokenizer("D tail").input_ids:
        shown += stream.push(token)
        if stream.finish:
            break
    assert stream.finish is FinishReason.STOP_SEQUENCE
    assert shown == stream.text == "abc ENx "


def test_multibyte_characters_are_never_split():
    tokenizer, stream = _stream()
    pieces = [stream.push(t) for t in tokenizer("héllo ✓").input_ids]
    assert "".join(pieces) == "héllo ✓" and all("\ufffd" not in p for p in pieces)


def test_eos_and_length():
    _, stream = _stream(max_new=3)
    stream.push(70)
    stream.push(2)
    assert stream.finish is FinishReason.EOS_TOKEN
    _, stream = _stream(max_new=2)
    stream.push(70), stream.push(71)
    assert stream.finish is FinishReason.LENGTH


@pytest.fixture(scope="module")
def server(model_dirs):
    s = start_server(model_dirs["llama"], None)
    yield s
    s.stop()


def test_seeded_sampling_is_reproducible_inside_any_batch(server):
    kwargs = dict(max_new_tokens=16, temperature=0.9, top_p=0.95, top_k=40, seed=1234, ignore_eos=True)
    with Client(server.target, timeout=60) as client:
        alone = list(client.generate([5, 6, 7], **kwargs).token_ids)

    async def crowded():
        async with AsyncClient(server.target, timeout=60) as client:
            others = [client.generate([9 + i], max_new_tokens=16, temperature=1.0, ignore_eos=True) for i in range(6)]
            results = await asyncio.gather(client.generate([5, 6, 7], **kwargs), *others)
            return list(results[0].token_ids)
    assert asyncio.run(crowded()) == alone


def test_sampling_parameters_reach_the_draw_through_the_server(server):
    """temperature/top_k/top_p/seed sent over gRPC change the draw as they should: seeded draws repeat, differ from
    greedy and from each other across seeds, top_k 1 is greedy, and a tiny top_p is greedy."""
    with Client(server.target, timeout=60) as client:
        def tokens(**kw):
            return list(client.generate([5, 6, 7], max_new_tokens=12, ignore_eos=True, **kw).token_ids)
        greedy = tokens()
        seeded = [tokens(temperature=1.5, seed=s) for s in range(4)]
        assert tokens(temperature=1.5, seed=0) == seeded[0]
        assert all(t != greedy for t in seeded) and len({tuple(t) for t in seeded}) == 4
        assert tokens(temperature=1.5, top_k=1, seed=5) == greedy
        assert tokens(temperature=1.5, top_p=1e-6, seed=5) == greedy
        assert tokens(temperature=1.5, top_k=3, top_p=0.9, seed=0) != seeded[0]


def test_the_client_takes_one_stop_string_whole_and_refuses_a_bytes_prompt(server):
    """`stop="ab"` is one stop sequence (it was sent as "a" and "b"); a bytes prompt is not token ids (it was)."""
    with Client(server.target, timeout=60) as client:
        free = client.generate([5, 6, 7], max_new_tokens=12, ignore_eos=True)
        two = free.text[3:5]  # two characters the text holds after its start: only the pair stops it there
        one, listed = (client.generate([5, 6, 7], max_new_tokens=12, ignore_eos=True, stop=stop) for stop in (two, [two]))
        with pytest.raises(TypeError, match="not bytes"):
            client.generate(b"abc")
    assert one.text == listed.text == free.text[:free.text.find(two)]
    assert one.finish_reason == listed.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE


def test_stream_ends_with_finish_reason_and_usage(server):
    with Client(server.target, timeout=60) as client:
        messages = list(client.generate_stream("abc", max_new_tokens=6, ignore_eos=True, request_id="r-1"))
    assert all(m.request_id == "r-1" for m in messages)
    assert sum(len(m.token_ids) for m in messages) == 6 and messages[-1].finish_reason != 0
    assert messages[-1].usage.prompt_tokens == 3 and messages[-1].usage.completion_tokens == 6
    assert all(m.finish_reason == 0 for m in messages[:-1])


def test_unary_reply_equals_the_stream_it_gathers(server):
    """A unary Generate gathers its tokens on the engine thread and hears only the end: its ids, text and finish
    equal what a stream of the same request shows, with and without a stop sequence, with other requests
    decoding beside it."""
    with Client(server.target, timeout=60) as client:
        probe = client.generate("abc", max_new_tokens=12, ignore_eos=True)
        stop = probe.text[3:5] if len(probe.text) >= 5 else None

    async def both(**kwargs):
        async with AsyncClient(server.target, timeout=60) as client:
            async def streamed():
                return [m async for m in client.generate_stream("abc", **kwargs)]
            others = [client.generate([9 + i], max_new_tokens=20, ignore_eos=True) for i in range(4)]
            unary, messages, *_ = await asyncio.gather(client.generate("abc", **kwargs), streamed(), *others)
            return unary, messages
    for kwargs in [dict(max_new_tokens=12, ignore_eos=True), dict(max_new_tokens=12, stop=[stop] if stop else [])]:
        unary, messages = asyncio.run(both(**kwargs))
        assert list(unary.token_ids) == [t for m in messages for t in m.token_ids]
        assert unary.text == "".join(m.text for m in messages)
        assert unary.finish_reason == messages[-1].finish_reason != 0
        assert unary.usage.completion_tokens == messages[-1].usage.completion_tokens == len(unary.token_ids)
    assert stop is None or unary.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE  # the stop case really stopped


def test_a_run_of_invalid_bytes_is_shown_as_replacement_characters_in_linear_time():
    """Bytes that can never complete a UTF-8 character (a high-temperature byte model emits them) are shown as
    U+FFFD, as decoding all the ids gives, after at most 4 tokens; the text is never held back for the whole run,
    and the ids decoded per token stay bounded (the window used to grow with the run: quadratic)."""
    tokenizer, stream = _stream(max_new=2000)
    lone = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("é"))[1]  # a continuation byte on its own
    decoded = []
    decode = tokenizer.decode
    stream._tokenizer = type("Counting", (), {"decode": lambda self, ids, **kw: (decoded.append(len(ids)),
                                                                                   decode(ids, **kw))[1]})()
    shown = "".join(stream.push(lone) for _ in range(2000))
    assert shown == stream.text == decode([lone] * 2000, skip_special_tokens=True) == "\ufffd" * 2000
    assert sum(decoded) < 20 * 2000


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_a_character_cut_by_max_new_tokens_ends_the_text_as_decoding_the_ids_does(cut):
    tokenizer, stream = _stream(max_new=2 + cut)
    ids = tokenizer("ab😀").input_ids[:2 + cut]  # the emoji's 4 bytes, cut after `cut` of them
    shown = "".join(stream.push(t) for t in ids)
    assert stream.finish is FinishReason.LENGTH
    assert shown == stream.text == tokenizer.decode(ids, skip_special_tokens=True) == "ab\ufffd"


def test_streamed_text_is_always_a_prefix_of_decoding_the_ids_and_ends_equal_to_it():
    """Random byte soups: characters of 1-4 bytes, some cut, repeated or reordered into invalid sequences, and
    special tokens (decoded as nothing) anywhere, inside characters too."""
    tokenizer = build_tokenizer()
    pieces = [tokenizer(s).input_ids for s in ("a", " b", "é", "ж", "日本", "😀", "\n")]
    rng = random.Random(0)
    for _ in range(300):
        ids = [i for _ in range(rng.randint(1, 12)) for i in rng.choice(pieces)]
        for _ in range(rng.randint(0, 6)):  # cut, repeat or move a byte, or add a special token
            k, how = rng.randrange(len(ids)), rng.randrange(3)
            moved = ids.pop(k) if how == 0 else ids[k] if how == 1 else 1  # 1: <s>
            ids.insert(rng.randrange(len(ids) + 1), moved)
        assert_streams_as_decode(tokenizer, ids, valid=False)


def assert_streams_as_decode(tokenizer, ids: list[int], valid: bool) -> None:
    """The shown text is a prefix of decoding all the ids at every token and equals it at the end; for ids of
    valid text no U+FFFD is ever shown."""
    stream = TextStream(tokenizer, StoppingParams(len(ids)), frozenset({2}))
    full, shown = tokenizer.decode(ids, skip_special_tokens=True), ""
    for token in ids:
        shown += stream.push(token)
        assert full.startswith(shown), (ids, shown, full)
    assert shown == stream.text == full, (ids, shown, full)
    assert not valid or "\ufffd" not in shown, (ids, shown)


def sentencepiece_style_tokenizer():
    """A Llama-2 / Mistral style tokenizer: "▁" for spaces, byte fallback for characters outside its small
    vocabulary (each byte a token, each invalid byte its own U+FFFD), the leading space stripped when decoding."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *bytes_],
                                  initial_alphabet=list("abcdefghijklmnopqrstuvwxyz▁"))
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "hello world, ok"] * 20, trainer)
    spec = json.loads(tok.to_str())  # the byte tokens are plain vocabulary, as in Llama's (not skipped as special)
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in bytes_]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def test_byte_fallback_characters_stream_whole_after_tokens_that_decode_to_nothing():
    """With a byte-fallback tokenizer a completion that starts with an emoji is "▁" (decoded as nothing: the
    leading space is stripped) then four byte tokens; special tokens decode to nothing too. Such tokens used to
    count as bytes, so the emoji's first bytes were folded as U+FFFD (shown "��ok" for "😀 ok")."""
    tokenizer = sentencepiece_style_tokenizer()
    for text in ("😀 ok", "fox 😀🦊 ok", "日本 the dog", "ß€ hello", "x 漢字"):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert_streams_as_decode(tokenizer, ids, valid=True)
        with_specials = [i for t in ids for i in (t, 1)]  # a skipped special token after every token
        assert_streams_as_decode(tokenizer, with_specials, valid=True)
    rng = random.Random(1)
    words = ["the ", "fox ", "hello", ", ", " ", "😀", "🦊", "日本", "ß", "€", "\n", "ok"]
    for _ in range(300):
        text = "".join(rng.choice(words) for _ in range(rng.randint(1, 10)))
        assert_streams_as_decode(tokenizer, tokenizer(text, add_special_tokens=False).input_ids, valid=True)


class ByteLevelTokens:
    """A byte-level BPE tokenizer's decoding (GPT-2, Llama-3, Qwen): each id is a byte string, the ids' bytes are
    decoded together, invalid ones as U+FFFD. `decoded` counts the ids decoded."""

    def __init__(self, pieces: dict[int, bytes]) -> None:
        self.pieces, self.decoded = pieces, 0

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=None):
        self.decoded += len(ids)
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def test_tokens_that_cut_every_character_are_shown_as_their_characters_complete():
    """"日本" repeated as tokens [E6 97] [A5 E6 9C] [AC E6 97] [A5 E6 9C] ...: every token ends inside a character,
    so no token split is clean. All but the unfinished character is shown at every step, and decoding stays
    quadratic overall (it searched every split at every token: cubic, 45 s for 801 tokens, nothing shown)."""
    pieces = {0: b"\xe6\x97", 1: b"\xa5\xe6\x9c", 2: b"\xac\xe6\x97"}
    tokenizer, reference = ByteLevelTokens(pieces), ByteLevelTokens(pieces)
    n = 400
    ids = [0] + [1 + i % 2 for i in range(n - 1)]
    stream, shown = TextStream(tokenizer, StoppingParams(n), frozenset()), ""
    for k, token in enumerate(ids, 1):
        shown += stream.push(token)
        full = reference.decode(ids[:k])
        assert full.startswith(shown) and len(shown) >= len(full.rstrip("\ufffd")), (k, shown, full)
    assert shown == reference.decode(ids) and shown.startswith("日本日本")
    assert tokenizer.decoded < 2 * n * n


def test_stop_matching_equals_searching_the_whole_text_at_every_step():
    """Random stops over a two-letter alphabet (overlaps everywhere) against the text growing by random chunks:
    the earliest match and the held-back length equal a search of the whole text."""
    rng = random.Random(3)
    for _ in range(500):
        stops = tuple("".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4)))
        matcher, text = StopMatcher(stops), ""
        while len(text) < 40:
            text += "".join(rng.choice("ab") for _ in range(rng.randint(1, 5)))
            hits = [i for i in (text.find(s) for s in stops) if i >= 0]
            assert matcher.first_match(text) == (min(hits) if hits else None), (stops, text)
            if hits:
                break
            held = max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
            assert matcher.partial == held, (stops, text)


def test_long_stop_sequences_cost_each_character_once():
    """16 stops of 256 characters over 4,000 generated characters: every step used to search the whole text and
    test every prefix of every stop (seconds of engine-thread time; here a few hundredths)."""
    rng = random.Random(0)
    stops = tuple("".join(rng.choice("abc") for _ in range(256)) for _ in range(16))
    matcher, text = StopMatcher(stops), ""
    started = time.perf_counter()
    for _ in range(4000):
        text += rng.choice("abc")
        assert matcher.first_match(text) is None
        matcher.partial
    assert time.perf_counter() - started < 1.0
