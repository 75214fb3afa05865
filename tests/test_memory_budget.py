"""What the memory holds bounds the server at start: the adapter slot bank is refused before an allocation it cannot
make, and a KV budget left at 0 is what the memory free beside everything else holds; what the server drops (KV
caches, finished or refused requests, their adapters once unloaded) is freed at once, not by the cyclic collector."""
import asyncio

import grpc
import pytest

from clients.client import AsyncClient, Client
from tests.helpers import (left_for_the_collector, make_peft_adapter, scrape, slow_decode, start_server, status_of,
                           tokens_alone_and_together, wait_for)

C = grpc.StatusCode


@pytest.mark.parametrize("flag", ["max_lora_rank", "max_active_adapters", "max_hydra_heads"])
def test_a_slot_bank_beyond_the_free_memory_is_refused_before_it_is_allocated(model_dirs, flag, monkeypatch):
    """Asking for 2^31-1 of any slot dimension wanted terabytes and failed in the allocation with a traceback."""
    from adapters import slot_bank
    allocated = []
    real = slot_bank.SlotBank.__init__
    monkeypatch.setattr(slot_bank.SlotBank, "__init__",
                        lambda self, *a, **k: allocated.append(1) or real(self, *a, **k))
    with pytest.raises(RuntimeError, match=r"ConfigError\(.the adapter slot bank needs [0-9.]+ TiB .*, more than the "
                                           r".* free on cpu: lower --max-active-adapters, --max-lora-rank or "
                                           r"--max-hydra-heads"):
        start_server(model_dirs["llama"], None, **{flag: 2 ** 31 - 1})
    assert not allocated


def test_a_slot_bank_that_cannot_be_allocated_is_a_config_error(model_dirs, monkeypatch):
    """Where the free memory is not known (or shrank since), the allocation's failure names the flags."""
    from server import app
    monkeypatch.setattr(app, "free_memory", lambda device: None)
    with pytest.raises(RuntimeError, match=r"ConfigError\(.the adapter slot bank \([0-9.]+ TiB .*\) cannot be "
                                           r"allocated on cpu: .*can't allocate memory.*; lower --max-active-adapters"):
        start_server(model_dirs["llama"], None, max_lora_rank=2 ** 31 - 1)


def test_the_slot_bank_size_is_what_it_allocates(model_dirs, caplog):
    """The logged size is the bytes the bank's tensors take (routers: once a HydraLoRA adapter is loaded)."""
    import logging
    caplog.set_level(logging.INFO, logger="loraplex.app")
    server = start_server(model_dirs["llama"], None, max_active_adapters=3, max_lora_rank=5, max_hydra_heads=2)
    try:
        bank = server.serving.engine.bank
        factors = sum(t.numel() * t.element_size() for t in [*bank.a, *bank.b])
        routers = bank.g_bias.numel() * 4 + sum((3 + 1) * 2 * s.d_in * 4 for s in bank.shapes)  # g: [S+1, K, d_in]
        from server.config import size_text
        line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("adapter slot bank: "))
        assert line.startswith(f"adapter slot bank: {size_text(factors + routers)} (4 slots") and \
            f"{size_text(factors)} of factors" in line, line
    finally:
        server.stop()


def test_a_kv_budget_left_at_0_is_what_the_free_memory_holds(model_dirs, monkeypatch, caplog, tmp_path):
    """--max-kv-tokens 0 was --max-batch-size x the context whatever the memory: 32 rows of a 7B model at 4096 tokens
    want 64 GiB of keys and values, so a GPU ran out of memory under load. Now it is at most what KV_SHARE of the
    memory free once everything else is allocated holds; below the context, longer requests are refused. (QA) The
    free memory is faked here as the same before and after the model loads, as on the CPU, where a model mapped from
    its checkpoint's file leaves MemAvailable as it was: the model's bytes, and the slot bank's HydraLoRA routers
    (allocated with the first routed adapter), are what the budget must leave."""
    import logging

    from server import app
    from server.config import KV_SHARE, check_slot_bank
    from server.prefix_cache import PrefixCache
    caplog.set_level(logging.INFO, logger="loraplex.app")
    small = dict(max_active_adapters=1, max_lora_rank=1, max_hydra_heads=64)  # 0.5 MiB of routers, not allocated
    # on the CPU, an adapter root's host adapter cache (--adapter-cache-bytes) fills the same memory later; with no
    # root no adapter is read (tmp_path: an empty root)
    for free, warned, cache in ((3 << 20, False, 0), (1400 << 10, True, 0), ((3 << 20) + (1 << 20), False, 1 << 20)):
        monkeypatch.setattr(app, "free_memory", lambda device, free=free: free)
        caplog.clear()
        server = start_server(model_dirs["llama"], tmp_path if cache else None, adapter_cache_bytes=cache or 1 << 30,
                              **small)
        try:
            runner, model = server.serving.engine.runner, server.serving.base.model
            per_token = PrefixCache.bytes_per_token(runner.row_layout())
            held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
            bank = check_slot_bank(server.config, [(s.d_in, s.d_out) for s in runner.bank.shapes], 4, None)[1]
            assert held > 200 << 10 and bank > 500 << 10 and all(g is None for g in runner.bank.g)
            budget = int((free - held - bank - cache) * KV_SHARE) // per_token
            with Client(server.target, timeout=60) as client:
                info = client.server_info()
                assert info.limits.max_kv_tokens == server.serving.engine.config.max_kv_tokens == budget
                assert budget < info.max_batch_size * info.max_context_length
                assert (budget < info.max_context_length) == warned
                lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("KV cache: ")]
                assert f"KV cache: up to {budget} token slots" in lines[0] and "--max-kv-tokens sets it" in lines[0]
                assert ("host adapter cache (1.0 MiB, --adapter-cache-bytes)" in lines[0]) == bool(cache), lines[0]
                assert (len(lines) == 2 and "are refused, OUT_OF_RANGE" in lines[1]) == warned
                assert len(client.generate([5] * 100, max_new_tokens=200, ignore_eos=True).token_ids) == 200
                if warned:
                    code, details = status_of(client.generate, [5] * 400, max_new_tokens=100)
                    assert code == C.OUT_OF_RANGE and f"--max-kv-tokens {budget} (what its free memory held at " \
                                                      f"start), even alone" in details, details
        finally:
            server.stop()
    calls = iter([1 << 30, 1 << 30, 0])  # before the model loads; the slot bank fits; nothing is left once allocated
    monkeypatch.setattr(app, "free_memory", lambda device: next(calls))
    with pytest.raises(RuntimeError, match=r"no memory is left on cpu for the KV cache \(0 bytes free beside the model,"
                                           r" the slot bank and the prefix cache; .*lower --max-active-adapters, "
                                           r"--max-lora-rank, --max-hydra-heads or "):
        start_server(model_dirs["llama"], None, **small)
    calls = iter([1 << 30, 1 << 30, 1 << 30])  # the same, where the host adapter cache may take all that is left
    monkeypatch.setattr(app, "free_memory", lambda device: next(calls))
    with pytest.raises(RuntimeError, match=r"0 bytes free beside the model, the slot bank, the prefix cache and the "
                                           r"host adapter cache \(1.0 GiB, --adapter-cache-bytes\).*--max-hydra-heads, "
                                           r"--adapter-cache-bytes or --prefix-cache-tokens"):
        start_server(model_dirs["llama"], tmp_path, adapter_cache_bytes=1 << 30, **small)


def test_free_memory_on_the_cpu_stays_within_the_containers_limit(tmp_path):
    """MemAvailable is the machine's: a container's or a service's memory limit (its cgroup or one above it, v2 or v1)
    is what the kernel kills the process past. Inactive file pages count as room, as the kernel reclaims them first.
    (QA) The process's cgroup is the one /proc/self/cgroup names, not the mount's top (a host without a cgroup
    namespace: a systemd service's MemoryMax=, this machine's v1 set-up)."""
    from server.config import _within_cgroup

    def cgroup(at, limit, usage, inactive, v1=False):
        at.mkdir(parents=True, exist_ok=True)
        names = ("memory.limit_in_bytes", "memory.usage_in_bytes") if v1 else ("memory.max", "memory.current")
        (at / names[0]).write_text(f"{limit}\n")
        (at / names[1]).write_text(f"{usage}\n")
        (at / "memory.stat").write_text(f"anon 1\n{'total_' if v1 else ''}inactive_file {inactive}\n")
    own, none = tmp_path / "self", tmp_path / "no-such-file"
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    for limit, expected in (("5000", 4300), ("max", 10 ** 9)):  # a container: its cgroup at the mount's top
        cgroup(v2, limit, 1000, 300)
        assert _within_cgroup(10 ** 9, v2, none) == expected and _within_cgroup(100, v2, none) == 100
    for limit, expected in (("5000", 4200), (2 ** 63 - 4096, 10 ** 9)):
        cgroup(v1 / "memory", limit, 1000, 200, v1=True)
        assert _within_cgroup(10 ** 9, v1, none) == expected
    assert _within_cgroup(10 ** 9, tmp_path / "none", none) == 10 ** 9 and _within_cgroup(None, v2, none) is None
    cgroup(v2, "max", 10 ** 8, 0)  # a host's v2: the service's cgroup limits, and the slice above it limits more
    cgroup(v2 / "system.slice", 9000, 2000, 0)
    cgroup(v2 / "system.slice" / "loraplex.service", 5000, 1000, 300)
    own.write_text("0::/system.slice/loraplex.service\n")
    assert _within_cgroup(10 ** 9, v2, own) == 4300
    cgroup(v2 / "system.slice", 5000, 2000, 0)
    assert _within_cgroup(10 ** 9, v2, own) == 3000
    cgroup(v1 / "memory", 2 ** 63 - 4096, 4 * 10 ** 9, 0, v1=True)  # v1, the hierarchy's root mounted
    cgroup(v1 / "memory" / "process_api" / "x", 5000, 1000, 200, v1=True)
    own.write_text("4:memory:/process_api/x\n1:cpu:/\n0::/\n")
    assert _within_cgroup(10 ** 9, v1, own) == 4200



def test_kv_caches_and_adapter_weights_the_server_drops_are_freed_at_once(model_dirs, tmp_path):
    """A KV cache and its layers referred to each other, so a cache the engine dropped (merged into a new batch's,
    selected, a prefill's once its rows joined) kept its buffers until Python's cyclic collector ran, which for a
    long-lived batch's cache (an old generation) can be minutes: with it on, 120 requests of staggered arrivals left
    95 dropped caches behind, and the bytes of all caches, sampled, peaked at 2.4x the engine's own, beyond the KV
    budget it keeps to. Likewise a request and its sink: an adapter evicted from the host cache, unloaded or replaced
    kept its weights while a finished request on it waited for the collector. With the collector off, this workload
    (prefix cache, a chunked prompt, rows joining and leaving, evictions, an unload, a replace) leaves no tensor."""
    for i in range(3):
        make_peft_adapter(model_dirs["llama"], tmp_path / f"a{i}", i, r=4, lora_alpha=8,
                          target_modules=["q_proj", "v_proj"])
    server = start_server(model_dirs["llama"], tmp_path, prefix_cache_tokens=256, max_prefill_tokens=32,
                          max_active_adapters=2, adapter_cache_bytes=15_000)  # two of the three (7168 bytes each)
    prompts = [[(3 * i + j) % 200 + 4 for j in range(2 + 9 * i)] for i in range(8)]  # the longest: chunks
    ids = ["a0", "", "a1", "", "a2", "a0", "a1", "a2"]

    def workload():
        for _ in range(2):  # the second time, prompts start from the prefix cache
            alone, together = tokens_alone_and_together(server.target, prompts, ids, 12)
            assert together == alone
        assert scrape(server)['loraplex_adapters_loaded{tier="disk"}'] == 1  # one of them evicted
        with Client(server.target, timeout=30) as client:
            assert client.get_adapter("a0").size_bytes == 7168
            client.load_adapter("a0", replace=True)
            client.unload_adapter("a1")
        assert wait_for(server.serving.engine.idle)
    try:
        _, left = left_for_the_collector(workload)
    finally:
        server.stop()
    assert left == 0, f"{left} tensors waited for the cyclic collector"


def test_a_call_refused_once_its_adapter_was_resolved_leaves_nothing_for_the_collector(model_dirs, tmp_path,
                                                                                         monkeypatch):
    """A request refused by the engine's queue after its adapter was resolved (RESOURCE_EXHAUSTED): grpc keeps the
    abort's exception in a cycle, and through the error's traceback the frames that held the request, its adapter
    with it: once unloaded, the adapter's weights waited for the cyclic collector."""
    make_peft_adapter(model_dirs["llama"], tmp_path / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    server = start_server(model_dirs["llama"], tmp_path, max_batch_size=1, max_queue_size=1)
    try:
        with Client(server.target, timeout=60) as client:
            client.generate([5, 6], "a", max_new_tokens=2)  # read before the burst: every call finds it resolved
        slow_decode(server, monkeypatch, 0.02)

        def workload() -> list:
            async def burst():
                async with AsyncClient(server.target, timeout=60) as client:
                    return await asyncio.gather(*[client.generate([5, 6, i], "a", max_new_tokens=15, ignore_eos=True)
                                                  for i in range(4)], return_exceptions=True)
            replies = asyncio.run(burst())
            assert wait_for(server.serving.engine.idle, 20)
            with Client(server.target, timeout=60) as client:
                client.unload_adapter("a")
            return replies
        replies, left = left_for_the_collector(workload)
    finally:
        server.stop()
    refused = [r for r in replies if isinstance(r, grpc.RpcError)]
    assert refused and all(r.code() == C.RESOURCE_EXHAUSTED for r in refused), replies
    assert left == 0, f"{left} tensors waited for the cyclic collector"
