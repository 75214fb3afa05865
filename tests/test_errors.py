"""Every bad input gets a precise status and an actionable message; none of them stops the server."""
import asyncio
import json
import math
import os
import shutil

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.targets import matches
from clients.client import AsyncClient, Client
from tests.helpers import make_peft_adapter, scrape, slow_decode, start_server, status_of, wait_for

C = grpc.StatusCode


@pytest.fixture(scope="module")
def adapter_root(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    llama = model_dirs["llama"]
    good = make_peft_adapter(llama, root / "good", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    tensors = load_file(good / "adapter_model.safetensors")

    def variant(name, tensors=tensors, config_edit=None, raw_config=None):
        d = root / name
        d.mkdir()
        config = json.loads((good / "adapter_config.json").read_text())
        if config_edit:
            config.update(config_edit)
        (d / "adapter_config.json").write_text(raw_config if raw_config is not None else json.dumps(config))
        if tensors is not None:
            save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(d / "adapter_model.safetensors"),
                      metadata={"format": "pt"})
        return d

    pickle_dir = variant("pickled", tensors=None)
    torch.save(tensors, pickle_dir / "adapter_model.bin")
    variant("missing-module", {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()})
    variant("bad-shape", {k: (v[:, :-1] if "q_proj.lora_A" in k else v) for k, v in tensors.items()})
    variant("rank-too-high", {k: torch.cat([v] * 8, dim=0 if "lora_A" in k else 1) for k, v in tensors.items()},
            config_edit={"r": 32})
    variant("not-json", raw_config="{not json")
    variant("dora", config_edit={"use_dora": True})
    variant("moe-experts", config_edit={"target_parameters": ["experts.gate_up_proj", "experts.down_proj"]})
    # later PEFT LoRA variants, each a config key with its own forward: refused by name, never served as LoRA
    variant("alora", config_edit={"alora_invocation_tokens": [5, 6]})
    variant("bdlora", config_edit={"use_bdlora": {"target_modules_bd_a": ["q_proj"], "nblocks": 2}})
    variant("future-variant", config_edit={"some_new_variant": True})
    variant("corda-unconverted", config_edit={"init_lora_weights": "corda"})
    # PiSSA doubles the served rank (its residual base is a second rank-r term): 2 x 12 > --max-lora-rank 16
    variant("pissa-too-wide", {k: torch.cat([v] * 3, dim=0 if "lora_A" in k else 1) for k, v in tensors.items()},
            config_edit={"r": 12, "init_lora_weights": "pissa"})
    variant("no-targets", config_edit={"target_modules": None})
    variant("no-targets-key", raw_config=json.dumps({k: v for k, v in json.loads(
        (good / "adapter_config.json").read_text()).items() if k != "target_modules"}))
    variant("lm-head", {**tensors, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64),
                        "base_model.model.lm_head.lora_B.weight": torch.zeros(256, 4)},
            config_edit={"target_modules": ["q_proj", "v_proj", "lm_head"]})
    variant("layers-empty", config_edit={"layers_to_transform": [], "layers_pattern": None})  # PEFT: every layer
    # what PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) writes: served
    variant("corda-converted", config_edit={"init_lora_weights": True, "corda_config": {"corda_method": "kpm"}})
    variant("unknown-key", {**tensors, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude": tensors[
        next(iter(tensors))]})
    variant("nan", {k: (torch.full_like(v, math.nan) if i == 0 else v) for i, (k, v) in enumerate(tensors.items())})
    variant("missing-b", {k: v for k, v in tensors.items() if "layers.0.self_attn.q_proj.lora_B" not in k})
    variant("unknown-type", config_edit={"peft_type": "IA3"})
    variant("inf", {k: (torch.full_like(v, -math.inf) if i == 1 else v) for i, (k, v) in enumerate(tensors.items())})
    variant("int-dtype", {k: (v.to(torch.int32) if i == 0 else v) for i, (k, v) in enumerate(tensors.items())})
    blob = (good / "adapter_model.safetensors").read_bytes()
    (variant("truncated") / "adapter_model.safetensors").write_bytes(blob[:len(blob) // 2])
    (variant("corrupt") / "adapter_model.safetensors").write_bytes(b"\xff" * 64 + blob[64:])
    variant("config-not-object", raw_config="[1, 2]")
    variant("type-not-string", config_edit={"peft_type": ["LORA"]})
    variant("alpha-nan", config_edit={"lora_alpha": math.nan})  # json writes NaN, and Python's json reads it
    variant("alpha-overflows", config_edit={"lora_alpha": 1e300})  # finite, but B x scaling is not in fp32
    variant("rank-text", config_edit={"r": "4"})
    variant("rank-pattern-list", config_edit={"rank_pattern": [4]})
    variant("rank-null", config_edit={"r": None})
    variant("rslora-text", config_edit={"use_rslora": "false"})  # bool("false") is True: a different scaling
    variant("targets-number", config_edit={"target_modules": 5})
    variant("targets-bad-regex", config_edit={"target_modules": "(["})
    variant("untargeted-tensors", config_edit={"target_modules": ["q_proj"]})  # PEFT would drop the v_proj ones
    variant("huge-config", config_edit={"notes": "x" * (4 << 20)})  # never read into memory
    outside = root.parent / (root.name + "-outside")
    outside.mkdir()
    os.symlink(outside, root / "escape")
    # files are never followed out of their directory, even to files in the root: deploys link whole directories
    for name, target in (("weights-link-out", outside / "adapter_model.safetensors"),
                         ("config-link-out", outside / "adapter_config.json"),
                         ("weights-link-in", good / "adapter_model.safetensors")):
        shutil.copy(good / target.name, outside / target.name)
        link = variant(name) / target.name
        link.unlink()
        os.symlink(target, link)
    os.mkfifo(variant("weights-fifo", tensors=None) / "adapter_model.safetensors")  # would block a plain open
    (variant("weights-dir", tensors=None) / "adapter_model.safetensors").mkdir()
    return root


@pytest.fixture(scope="module")
def server(model_dirs, adapter_root):
    s = start_server(model_dirs["llama"], adapter_root, max_lora_rank=16)
    yield s
    s.stop()


@pytest.fixture()
def client(server):
    with Client(server.target, timeout=30) as c:
        yield c


def test_unknown_adapter_is_not_found_never_the_base_model(client):
    code, details = status_of(client.generate, "hi", "no-such-adapter")
    assert code == C.NOT_FOUND and "no-such-adapter" in details


def test_ids_that_name_nothing_leave_nothing_behind(server, client):
    """Not found by GenerateRequest, LoadAdapter, GetAdapter or UnloadAdapter: the registry keeps no per-id state
    for them (LoadAdapter left a lock per made-up id, ~300 bytes each, for the life of the process)."""
    locks = len(server.serving.registry._id_locks)
    for i in range(20):
        for call in (client.load_adapter, client.get_adapter, client.unload_adapter):
            assert status_of(call, f"made-up-{i}")[0] == C.NOT_FOUND
        assert status_of(client.generate, "hi", f"made-up-{i}")[0] == C.NOT_FOUND
    assert len(server.serving.registry._id_locks) == locks


@pytest.mark.parametrize("bad_id", ["../good", "a/b", "/etc", ".", "..", "x" * 200, "good\x00", "-lead"])
def test_ids_escaping_the_root_are_invalid(client, bad_id):
    code, details = status_of(client.generate, "hi", bad_id)
    assert code == C.INVALID_ARGUMENT and "adapter_id" in details
    assert len(details) < 400  # a long id is shown cut, with its length


def test_symlink_out_of_the_root_is_invalid(client):
    code, details = status_of(client.load_adapter, "escape")
    assert code == C.INVALID_ARGUMENT and "outside the adapter root" in details


def test_peft_converted_adapters_are_served_as_the_good_one(client):
    """CorDA/LoRA-GA/PiSSA adapters PEFT converted at save keep their *_config (init only) beside init true."""
    assert client.generate("hi", "corda-converted", max_new_tokens=4).token_ids == \
        client.generate("hi", "good", max_new_tokens=4).token_ids


def test_adapters_for_a_rewritten_base_are_served_with_a_warning_saying_what_they_need(client, caplog):
    """Unconverted CorDA (or LoRA-GA, LoftQ) is exact on the base saved with it, which may well be --model, and no
    load can rebuild it from the original weights (PEFT's cannot either): it is served, and the log says so once per
    read. (PiSSA and OLoRA are rebuilt as PEFT does: test_peft_parity.)"""
    with caplog.at_level("WARNING", logger="loraplex.adapters"):
        assert len(client.generate("hi", "corda-unconverted", max_new_tokens=2).token_ids) == 2
    assert "'corda-unconverted': init_lora_weights is 'corda', which rewrote the base model's weights" \
        in caplog.text and "path_initial_model_for_weight_conversion" in caplog.text


def test_all_linear_is_read_in_any_case_as_peft_reads_it():
    assert matches("ALL-LINEAR", "model.layers.0.self_attn.k_proj") and matches("All-Linear", "h.0.mlp.c_fc")


def test_an_empty_layers_to_transform_is_every_layer_as_peft_reads_it(client):
    assert client.generate("hi", "layers-empty", max_new_tokens=4).token_ids == \
        client.generate("hi", "good", max_new_tokens=4).token_ids


@pytest.mark.parametrize("adapter_id,needle", [
    ("pickled", "convert to safetensors"),
    ("missing-module", "model.layers.7.self_attn.q_proj"),
    ("bad-shape", "model.layers.0.self_attn.q_proj.lora_A.weight has shape"),
    ("rank-too-high", "above the server's --max-lora-rank 16"),
    ("not-json", "not valid JSON"),
    ("dora", "use_dora"),
    ("moe-experts", "target_parameters is set (LoRA on parameters, such as a mixture-of-experts model's fused experts"),
    ("alora", "sets alora_invocation_tokens = [5, 6], a PEFT feature the server does not serve"),
    ("bdlora", "sets use_bdlora = "),
    ("future-variant", "sets some_new_variant = True"),
    ("unknown-key", "lora_magnitude"),
    ("nan", "NaN or Inf"),
    ("missing-b", "missing key base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"),
    ("unknown-type", "'IA3'"),
    ("inf", "NaN or Inf"),
    ("int-dtype", "dtype torch.int32, expected floating point"),
    ("truncated", "cannot read adapter_model.safetensors"),
    ("corrupt", "cannot read adapter_model.safetensors"),
    ("config-not-object", "must be an object"),
    ("type-not-string", "peft_type ['LORA'] is not served"),
    ("alpha-nan", "config lora_alpha must be a finite number, got nan"),
    ("alpha-overflows", "lora_B x scaling is not finite"),
    ("rank-text", "config r must be a positive integer, got '4'"),
    ("rank-pattern-list", "config rank_pattern must be an object"),
    ("rank-null", "config r must be a positive integer, got None"),
    ("rslora-text", "config use_rslora must be true or false"),
    ("targets-number", "config target_modules must be a list of module names or a regular expression"),
    ("targets-bad-regex", "config target_modules must be a valid regular expression"),
    ("untargeted-tensors", "v_proj.lora_A.weight is for module 'model.layers.0.self_attn.v_proj', which the config"),
    ("pissa-too-wide", "has rank 12 + 12 (its pissa residual base, served as a second term on the base weights) 24, "
                       "above the server's --max-lora-rank 16"),
    ("lm-head", "targets module 'lm_head', which this server does not adapt: it is not a linear layer of this base "
                "model that --target-modules allows (the output head and the embeddings are never adapted)"),
    ("no-targets", "has no target_modules: PEFT would adapt its default modules for the model type"),
    ("no-targets-key", "has no target_modules: PEFT would adapt its default modules for the model type"),
    ("huge-config", "bytes, above 4194304: it holds settings, not weights"),
    ("weights-link-out", "'weights-link-out': adapter_model.safetensors is a symbolic link; adapter files must be"),
    ("config-link-out", "'config-link-out': adapter_config.json is a symbolic link; adapter files must be"),
    ("weights-link-in", "'weights-link-in': adapter_model.safetensors is a symbolic link; adapter files must be"),
    ("weights-fifo", "'weights-fifo': adapter_model.safetensors is a named pipe, not a regular file"),
    ("weights-dir", "'weights-dir': adapter_model.safetensors is a directory, not a regular file"),
])
def test_unservable_adapters_fail_precondition_naming_the_problem(client, adapter_id, needle):
    for call in (lambda: client.generate("hi", adapter_id), lambda: client.load_adapter(adapter_id)):
        code, details = status_of(call)
        assert code == C.FAILED_PRECONDITION and needle in details, details
    assert len(client.generate("hi", "good", max_new_tokens=2).token_ids) == 2  # still serving


@pytest.mark.parametrize("kwargs,needle", [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(temperature=1.0, top_p=0.0), "top_p"),
    (dict(temperature=1.0, top_p=1.5), "top_p"),
    (dict(temperature=1.0, top_p=math.inf), "top_p"),
    (dict(temperature=1.0, top_k=-3), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-5), "max_new_tokens"),
    (dict(stop=[""]), "stop"),
    (dict(repetition_penalty=0.0), "sampling.repetition_penalty must be in [0.01, 100] (1 disables), got 0.0"),
    (dict(repetition_penalty=1e-40), "sampling.repetition_penalty must be in [0.01, 100]"),  # overflowed logits
    (dict(repetition_penalty=1e3), "sampling.repetition_penalty must be in [0.01, 100]"),
    (dict(repetition_penalty=math.nan), "sampling.repetition_penalty must be a finite number"),
    (dict(presence_penalty=2.5), "sampling.presence_penalty must be in [-2, 2]"),
    (dict(frequency_penalty=-3.0), "sampling.frequency_penalty must be in [-2, 2]"),
    (dict(temperature=1.0, min_p=1.5), "sampling.min_p must be in [0, 1]"),
    (dict(min_new_tokens=-1), "stopping.min_new_tokens must be >= 0"),
    (dict(max_new_tokens=4, min_new_tokens=5), "min_new_tokens 5 is above the max_new_tokens 4 the request asks for"),
    (dict(min_new_tokens=10 ** 6), "min_new_tokens 1000000 is above the max_new_tokens"),
    (dict(stop_token_ids=[5, 10 ** 6]), "stopping.stop_token_ids holds 1000000, outside the vocabulary"),
    (dict(stop_token_ids=[-1]), "stopping.stop_token_ids holds -1"),
    (dict(stop_token_ids=list(range(65))), "stopping.stop_token_ids takes at most 64 ids, got 65"),
    (dict(logit_bias={5: 1.0, 10 ** 6: -1.0}), "sampling.logit_bias names token id 1000000, outside the vocabulary"),
    (dict(logit_bias={-1: 1.0}), "sampling.logit_bias names token id -1"),
    (dict(logit_bias={5: 101.0}), "sampling.logit_bias[5] must be in [-100, 100], got 101"),
    (dict(logit_bias={5: 100.00001}), "sampling.logit_bias[5] must be in [-100, 100], got 100.000008"),
    (dict(logit_bias={7: math.inf}), "sampling.logit_bias[7] must be a finite number"),
    (dict(logit_bias=dict.fromkeys(range(301), 1.0)), "sampling.logit_bias takes at most 300 token ids, got 301"),
])
def test_bad_sampling_and_stopping_are_invalid(client, kwargs, needle):
    code, details = status_of(client.generate, "hi", **kwargs)
    assert code == C.INVALID_ARGUMENT and needle in details, details


def test_bad_prompts_are_invalid(client):
    from protos.loraplex.v1 import inference_pb2 as pb
    assert status_of(client.inference.Generate, pb.GenerateRequest())[0] == C.INVALID_ARGUMENT
    assert status_of(client.generate, "")[0] == C.INVALID_ARGUMENT
    code, details = status_of(client.generate, [5, 100000])
    assert code == C.INVALID_ARGUMENT and "100000" in details
    assert status_of(client.generate, [-1])[0] == C.INVALID_ARGUMENT


def test_context_overflow_is_out_of_range(client):
    context = client.server_info().max_context_length
    code, details = status_of(client.generate, [5] * 10, max_new_tokens=context - 5)
    assert code == C.OUT_OF_RANGE and str(context) in details
    assert status_of(client.generate, "hi", max_new_tokens=context + 1)[0] == C.OUT_OF_RANGE
    code, details = status_of(client.generate, [5] * (context + 1), max_new_tokens=1)  # the prompt alone is too long
    assert code == C.OUT_OF_RANGE and "max-prompt-tokens" not in details and str(context) in details


def test_load_twice_without_replace_already_exists(client):
    version = client.load_adapter("good", replace=True).version  # loaded (maybe already, by first use)
    code, details = status_of(client.load_adapter, "good")
    assert code == C.ALREADY_EXISTS and "replace" in details
    code, details = status_of(client.load_adapter, "good", pin=True)  # how to pin it is in the message
    assert code == C.ALREADY_EXISTS and "(not pinned); set replace to swap in new files, and pin with it" in details
    assert client.load_adapter("good", replace=True).version == version + 1


def test_full_queue_is_resource_exhausted(model_dirs, adapter_root):
    server = start_server(model_dirs["llama"], adapter_root, max_batch_size=1, max_queue_size=1)

    async def scenario():
        async with AsyncClient(server.target, timeout=60) as client:
            running = client.inference.GenerateStream(
                __import__("clients.client", fromlist=["x"]).build_request([5], max_new_tokens=480, ignore_eos=True))
            await running.read()  # admitted and decoding: the batch (size 1) is full
            queued = asyncio.create_task(client.generate([6], max_new_tokens=2))
            await asyncio.sleep(0.2)  # now waiting: the queue (size 1) is full
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.generate([7], max_new_tokens=2)
            assert info.value.code() == C.RESOURCE_EXHAUSTED and "--max-queue-size" in info.value.details()
            running.cancel()
            assert len((await queued).token_ids) == 2  # the queued one still runs
    try:
        asyncio.run(scenario())
    finally:
        server.stop()


def test_a_burst_of_batch_plus_queue_requests_is_taken_whole(model_dirs, adapter_root):
    """The batch's free rows take the first requests of a burst at the engine's next step: they never wait, so an
    idle server takes --max-batch-size + --max-queue-size requests at once (it refused those beyond the queue's size
    that arrived before the engine's next step), and refuses the one after them."""
    import threading
    server = start_server(model_dirs["llama"], adapter_root, max_batch_size=2, max_queue_size=2)
    gate = threading.Event()
    held = server.serving.engine.call(gate.wait)  # the whole burst arrives before its next step (a sleep of 3 s was
    # not always long enough for a loaded machine to send it)

    async def burst():
        async with AsyncClient(server.target, timeout=60) as client:
            calls = [asyncio.ensure_future(client.generate([5 + i], max_new_tokens=2, ignore_eos=True))
                     for i in range(5)]
            done, _ = await asyncio.wait(calls, return_when=asyncio.FIRST_EXCEPTION)  # the refusal: all five sent
            assert await asyncio.to_thread(wait_for, lambda: scrape(server)["loraplex_num_requests_waiting"] == 4)
            gate.set()
            return await asyncio.gather(*calls, return_exceptions=True)
    try:
        outcomes = asyncio.run(burst())
        held.result()
    finally:
        gate.set()
        server.stop()
    refused = [o for o in outcomes if isinstance(o, grpc.RpcError)]
    assert len(refused) == 1 and refused[0].code() == C.RESOURCE_EXHAUSTED, outcomes
    assert all(len(o.token_ids) == 2 for o in outcomes if o not in refused)


def test_rows_the_kv_budget_holds_back_take_no_request_beyond_the_queue(model_dirs, adapter_root, monkeypatch):
    """Free rows count for the queue's limit only where nothing else holds requests back: with a KV budget for one
    row, a second request waits, and a third is refused at --max-queue-size 1 (not taken for the free rows)."""
    server = start_server(model_dirs["llama"], adapter_root, max_batch_size=4, max_queue_size=1, max_kv_tokens=450)
    # the running row would last 20 s (it is cancelled at the end): a loaded machine's scrapes fit in it (at 5 s, the
    # row once ended first under a full suite and a helper's runs, and the waiting one took its place)
    slow_decode(server, monkeypatch, 0.05)

    async def scenario():
        async with AsyncClient(server.target, timeout=60) as client:
            running = client.generate_stream([5, 6], max_new_tokens=400, ignore_eos=True)  # 402 of the 450 slots
            await running.__anext__()
            waiting = asyncio.create_task(client.generate([7, 8], max_new_tokens=50, ignore_eos=True))  # 52 more
            assert await asyncio.to_thread(wait_for, lambda: scrape(server)["loraplex_num_requests_waiting"] == 1)
            # until an admission has tried it and left no row free (three engine calls in a row were not enough: the
            # engine runs calls that arrive while it takes its inbox in the same step, before any admission)
            engine = server.serving.engine
            while not await asyncio.wrap_future(engine.call(lambda: engine._pending.free == 0 and len(engine._waiting) == 1)):
                await asyncio.sleep(0.01)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.generate([9], max_new_tokens=2)
            assert info.value.code() == C.RESOURCE_EXHAUSTED and "--max-queue-size" in info.value.details()
            running.cancel()
            assert len((await waiting).token_ids) == 50
    try:
        asyncio.run(scenario())
    finally:
        server.stop()


def test_autoload_off_means_not_found_until_loaded(model_dirs, adapter_root):
    server = start_server(model_dirs["llama"], adapter_root, autoload_adapters=False)
    try:
        with Client(server.target, timeout=30) as client:
            code, details = status_of(client.generate, "hi", "good")
            assert code == C.NOT_FOUND and "LoadAdapter" in details
            client.load_adapter("good")
            assert len(client.generate("hi", "good", max_new_tokens=3).token_ids) == 3
            client.unload_adapter("good")
            assert status_of(client.generate, "hi", "good")[0] == C.NOT_FOUND
            assert status_of(client.unload_adapter, "good")[0] == C.NOT_FOUND
    finally:
        server.stop()


def test_adapter_directory_deleted_or_replaced_while_loaded(model_dirs, adapter_root, tmp_path):
    import shutil
    root = tmp_path / "root"
    shutil.copytree(adapter_root / "good", root / "moving")
    shutil.copytree(adapter_root / "good", root / "other")
    server = start_server(model_dirs["llama"], root, adapter_cache_bytes=1)  # one adapter in host memory at a time
    try:
        with Client(server.target, timeout=30) as client:
            first = client.generate([5, 6, 7], "moving", max_new_tokens=6, ignore_eos=True).token_ids
            shutil.rmtree(root / "moving")
            # still in memory: it keeps serving; a reload from the missing directory fails precisely
            assert client.generate([5, 6, 7], "moving", max_new_tokens=6, ignore_eos=True).token_ids == first
            code, details = status_of(client.load_adapter, "moving", replace=True)
            assert code == C.NOT_FOUND and "'moving'" in details
            client.generate("hi", "other", max_new_tokens=2)  # evicts 'moving' from host memory
            code, details = status_of(client.generate, [5, 6, 7], "moving", max_new_tokens=6)
            assert code == C.NOT_FOUND and "'moving'" in details
            assert len(client.generate("hi", "other", max_new_tokens=2).token_ids) == 2  # others still serve
            make_peft_adapter(model_dirs["llama"], root / "moving", 7, r=4, lora_alpha=64,
                              target_modules=["q_proj", "v_proj"])  # replaced by different weights
            again = client.generate([5, 6, 7], "moving", max_new_tokens=6, ignore_eos=True).token_ids
            assert again != first
            assert client.get_adapter("moving").version == 2  # new files are a new version, never passed as the old
    finally:
        server.stop()


def test_factors_beyond_the_bank_dtype_are_refused_at_load(model_dirs, tmp_path):
    """Finite in fp32 but beyond fp16's 65504 once scaled: an fp16 bank would store inf and every request on the
    adapter would fail; the load is refused instead, naming the dtype."""
    from transformers import AutoModelForCausalLM

    from loader.inject import inject
    from loader.peft_files import read_adapter
    from server.errors import FailedPrecondition
    path = make_peft_adapter(model_dirs["llama"], tmp_path / "loud", 5, r=2, lora_alpha=3e6, target_modules=["q_proj"])
    _, shapes = inject(AutoModelForCausalLM.from_pretrained(model_dirs["llama"]))
    by_name = {s.name: s for s in shapes}
    assert read_adapter(path, "loud", by_name, 16, 1, factor_dtype=torch.float32).modules  # fine in fp32
    with pytest.raises(FailedPrecondition, match=r"beyond float16 \(max 6.55e\+04\).*--adapter-dtype"):
        read_adapter(path, "loud", by_name, 16, 1, factor_dtype=torch.float16)


def test_weights_in_a_dtype_torch_cannot_hold_fail_precondition(tmp_path):
    """safetensors parses 4-bit floats, torch has no dtype for them: a user error naming the file, not INTERNAL."""
    import struct

    from loader.peft_files import read_tensors
    from server.errors import FailedPrecondition
    header = json.dumps({"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}).encode()
    (tmp_path / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0")
    with pytest.raises(FailedPrecondition, match="'x': cannot read adapter_model.safetensors"):
        read_tensors(tmp_path, "x")
