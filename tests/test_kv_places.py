"""Rows leave and join a running batch in place (server/kv_cache.py): the last rows move into the places of rows that
leave, newcomers take places rows left (and columns the batch trimmed), only those rows are copied, and every row
gets what it gets alone, whatever rows that left held in those places."""
import pytest
import torch

from server.batch import Row
from tests.helpers import decode_forced, random_lora_runner

STEPS = 8


@pytest.fixture(scope="module")
def runner(model_dirs):
    return random_lora_runner(model_dirs["llama"])


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class Rows:
    """Requests run alone first (their logits at every step, and the greedy tokens fed), then driven together: each
    row fed its own next token, its logits compared with its alone run's at the same step."""

    def __init__(self, runner, slot: int) -> None:
        self.runner, self.slot, self.alone, self.step = runner, slot, {}, {}

    def row(self, name: str, length: int, adapter: bool) -> Row:
        row = Row(prompt(length, len(self.alone) + 7 * length), self.slot if adapter else 0)
        logits, fed = decode_forced(self.runner, [Row(row.prompt_ids, row.slot)], steps=STEPS)
        self.alone[id(row)] = (name, logits[0], fed[0])
        return row

    def prefilled(self, rows: list[Row]):
        batch, logits = self.runner.prefill(rows)
        self.check(batch, logits, first=True)
        return batch

    def joined(self, batch, rows: list[Row]):
        late, logits = self.runner.prefill(rows)
        self.check(late, logits, first=True)
        return self.runner.merge(batch, late, self.runner.max_context)

    def decode(self, batch, steps: int) -> None:
        for _ in range(steps):
            for row in batch.rows:
                row.last_token = int(self.alone[id(row)][2][self.step[id(row)]])
            logits = self.runner.decode_step(batch)
            for row in batch.rows:
                self.step[id(row)] += 1
            self.check(batch, logits)

    def check(self, batch, logits, first: bool = False) -> None:
        for row, got in zip(batch.rows, logits):
            if first:
                self.step[id(row)] = 0
            name, alone, _ = self.alone[id(row)]
            assert torch.isfinite(got).all(), name
            torch.testing.assert_close(got, alone[self.step[id(row)]], atol=1e-5, rtol=0, msg=name)


def buffers(batch) -> list[int]:
    return [t.data_ptr() for layer in batch.cache.layers if layer.k is not None for t in (layer.k, layer.v)]


def poison(batch) -> None:
    """What rows that left held, as anything: NaN in every place and column outside the batch's window."""
    with torch.inference_mode():  # (the buffers are inference tensors)
        for layer in batch.cache.layers:
            if layer.k is not None:
                for t in (layer.k, layer.v):
                    t[len(batch):] = float("nan")
                    t[:, :, :layer.first] = float("nan")


def test_rows_leave_and_join_in_place_and_each_gets_what_it_gets_alone(runner):
    runner, slot = runner
    rows = Rows(runner, slot)
    a, b, c, d = rows.row("a", 5, True), rows.row("b", 11, False), rows.row("c", 3, True), rows.row("d", 7, True)
    batch = rows.prefilled([a, b, c, d])
    rows.decode(batch, 2)
    held, allocated = buffers(batch), batch.cache.allocated()

    batch = runner.keep(batch, [0, 2, 3], runner.max_context)  # b leaves: d takes its place, its columns trimmed
    assert [r for r in batch.rows] == [a, d, c]
    assert batch.cache.layers[0].first == 11 - 7 and batch.cache.length == 7 + 2
    assert buffers(batch) == held and batch.cache.allocated() == allocated
    rows.decode(batch, 1)

    poison(batch)
    e = rows.row("e", 4, False)  # shorter than the batch's columns: into b's place
    batch = rows.joined(batch, [e])
    assert batch.rows == [a, d, c, e] and buffers(batch) == held
    rows.decode(batch, 2)

    batch = runner.keep(batch, [1, 2, 3], runner.max_context)  # a leaves; e moves into its place
    assert batch.rows == [e, d, c] and buffers(batch) == held
    poison(batch)
    f = rows.row("f", 14, True)  # longer than the batch's 12 columns: takes 2 of the 4 it trimmed
    batch = rows.joined(batch, [f])
    assert batch.rows == [e, d, c, f] and buffers(batch) == held
    assert batch.cache.length == 14 and batch.cache.layers[0].first == 2
    rows.decode(batch, 3)


def test_rows_that_do_not_fit_the_places_join_in_new_buffers(runner):
    runner, slot = runner
    rows = Rows(runner, slot)
    a, b = rows.row("a", 6, True), rows.row("b", 4, False)
    batch = rows.prefilled([a, b])
    rows.decode(batch, 2)
    held = buffers(batch)
    batch = rows.joined(batch, [rows.row("c", 5, True)])  # no place left: a merge into new buffers
    assert buffers(batch) != held and len(batch) == 3
    held = buffers(batch)
    batch = runner.keep(batch, [1, 2], runner.max_context)
    batch = rows.joined(batch, [rows.row("d", 3, True), rows.row("e", 2, False)])  # two rows, one place
    assert buffers(batch) != held and len(batch) == 4
    rows.decode(batch, 3)


def test_buffers_shrink_to_the_rows_left_once_they_hold_over_twice_what_those_reserve(runner):
    runner, slot = runner
    rows = Rows(runner, slot)
    batch = rows.prefilled([rows.row(str(i), 4 + i, i % 2 == 0) for i in range(6)])
    rows.decode(batch, 2)
    slots = batch.cache.allocated()[0]  # 6 rows x (9 prompt columns, then grown to 18)
    assert slots == 6 * 18
    batch = runner.keep(batch, [0, 1, 5], 18)  # 3 rows x 18 reserved: half the buffers, kept
    assert batch.cache.allocated()[0] == slots and len(batch) == 3
    batch = runner.keep(batch, [0, 2], 18)  # 2 x 18 < 108 / 2: shrunk to the 2 rows (their 11 columns, room to 18)
    assert batch.cache.allocated()[0] == 2 * 18 and batch.cache.layers[0].first == 0
    rows.decode(batch, 3)


def test_a_join_that_fails_leaves_the_running_batch_as_it_was(runner, monkeypatch):
    """QA: a join failing after the newcomers were placed (gathering the rows' factors can run out of memory) left
    the running batch's cache with their rows and a wider window: the engine fails the newcomers only and goes on
    with the running batch, whose next step then failed, or whose next newcomer was written where no row read it."""
    runner, slot = runner
    rows = Rows(runner, slot)
    a, b, c = rows.row("a", 5, True), rows.row("b", 9, False), rows.row("c", 4, True)
    batch = rows.prefilled([a, b, c])
    rows.decode(batch, 2)
    batch = runner.keep(batch, [0, 2], runner.max_context)  # b leaves: a place, and 4 columns dropped
    failing = rows.row("failing", 10, True)  # would widen the window into 3 of them
    late, _ = runner.prefill([failing])
    gather = runner.bank.gather

    def out_of_memory(slots):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(runner.bank, "gather", out_of_memory)
    with pytest.raises(RuntimeError):
        runner.merge(batch, late, runner.max_context)
    assert batch.cache.size() == 2 and batch.cache.length == batch.valid.shape[1] == 7
    monkeypatch.setattr(runner.bank, "gather", gather)
    rows.decode(batch, 2)
    batch = rows.joined(batch, [rows.row("d", 3, True)])  # into the place left
    rows.decode(batch, 2)
