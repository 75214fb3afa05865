"""The load benchmark scaled down (bench/load.py): 200 concurrent streams over 50 adapters against the built-in
model in a child-process server; nothing is lost, every refusal is explicit, answers are right."""
from bench.load import run


def test_two_hundred_streams_over_fifty_adapters_lose_nothing():
    report = run(streams=200, adapters=50, server_flags=["--max-queue-size", "120", "--threads", "2"])
    s = report.summary()
    print(s)
    assert s["lost"] == 0 and s["failed"] == {}
    assert s["completed"] + s["rejected"] == 200
    assert s["rejected"] > 0 and all(o.code == "RESOURCE_EXHAUSTED" for o in report.outcomes if o.status == "rejected")
    assert s["completed"] >= 120
    assert s["correct"] >= 0.9 * s["completed"]  # the demo adapters answer their tasks through all the traffic
