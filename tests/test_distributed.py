"""Scaling with Dask (``ffnlib.distributed``): shards merged on a 2-worker cluster equal the
single-process result row for row (mining and aggregation), finished shards are reused, a worker killed
in the middle of a shard costs nothing but time, an address reaches a running cluster, and bad cluster
parameters say what is wrong.

A tiny random Llama saved to a temporary folder (so each worker can load it by path) keeps this fast;
one check runs on the real SmolLM2. Exactness holds at equal torch threads per process: both sides use 1.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import ffnlib.aggregation as agg  # noqa: E402
import ffnlib.distributed as dist  # noqa: E402
import ffnlib.keys as keys  # noqa: E402
from ffnlib import ParameterError, batching  # noqa: E402
from ffnlib.corpus import load_corpus  # noqa: E402
from ffnlib.models import load_model  # noqa: E402
from ffnlib.storage import read_json  # noqa: E402

MINE = {"k": 5, "batch_tokens": 256, "progress": False}
SHARD_TOKENS = 700


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Exactness holds at equal torch threads per process: the workers use 1, so does this process."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(smollm, tmp_path_factory):
    """A 3-layer random Llama with SmolLM2's tokenizer, saved to a folder and loaded from it by path."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                            bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.save_pretrained(folder)
    smollm.tokenizer.save_pretrained(folder)
    return load_model(str(folder))


@pytest.fixture(scope="module")
def sentences():
    """60 training sentences and the same 60 texts again under other ids: equal coefficients in
    different shards, so ties must be broken (by sentence id) the same way as in one process."""
    table = load_corpus("wiki", split="train", max_sentences=60)[["sentence_id", "text", "title", "topic"]]
    copy = table.assign(sentence_id=table["sentence_id"] + 10_000_000)
    return pd.concat([table, copy], ignore_index=True)


@pytest.fixture(scope="module")
def cluster():
    """A 2-worker LocalCluster started here; the tests reach it by its address string."""
    import dask
    from distributed import Client, LocalCluster

    saved = dist.environ_snapshot()
    with dask.config.set({"distributed.scheduler.allowed-failures": dist.ALLOWED_FAILURES}):
        local = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                             silence_logs=50)
    client = Client(local)
    yield local.scheduler_address, client
    client.close()
    local.close()
    dist.restore_environ(saved)  # the nanny wrote OMP_NUM_THREADS=1 etc. into os.environ: later tests spawn kernels


@pytest.fixture(scope="module")
def single(tiny, sentences, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return keys.mine_trigger_examples(tiny, sentences, out_dir=out, **MINE), out


@pytest.fixture(scope="module")
def mined(tiny, sentences, cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("cluster")
    result = dist.mine(tiny, sentences, cluster=cluster[0], shard_tokens=SHARD_TOKENS, keep_shards=True,
                       out_dir=out, **MINE)
    return result, out


def _parquet_checksums(folder: Path) -> dict:
    """The saved results' checksums: the Parquet files' (in their manifests) and the snapshots' top-k states'."""
    return {p.name: read_json(p)["sha256"] for p in sorted(folder.glob("triggers-*.manifest.json"))
            + sorted(folder.glob("triggers-*.state.json"))}


def _same_triggers(a: keys.TriggerExamples, b: keys.TriggerExamples) -> None:
    pd.testing.assert_frame_equal(a.triggers, b.triggers, check_exact=True)
    pd.testing.assert_frame_equal(a.sentences, b.sentences, check_exact=True)
    assert a.manifest == b.manifest


# ---- pure pieces --------------------------------------------------------------------------------------
def test_shards_are_consecutive_runs_of_batches_within_the_budget():
    costs = [300, 300, 100, 900, 100, 100, 100]
    shards = dist.plan_shards(costs, 700)
    assert shards == [(0, 3), (3, 4), (4, 7)]  # a batch over the budget is a shard of its own
    assert [i for a, b in shards for i in range(a, b)] == list(range(len(costs)))
    assert dist.plan_shards([], 10) == []
    assert dist.auto_shard_tokens(10) == dist.MIN_SHARD_TOKENS
    assert dist.auto_shard_tokens(10**9) == dist.MAX_SHARD_TOKENS


def test_bad_cluster_parameters_say_what_is_wrong(tiny, sentences):
    for bad in (5, "lokal", "", ["tcp://127.0.0.1:8786"]):
        with pytest.raises(ParameterError, match=r"cluster must be None \(one process, no Dask\), 'local'"):
            dist.mine(tiny, sentences, cluster=bad, **MINE)
    with pytest.raises(ParameterError, match="cluster must be None"):
        dist.aggregate(tiny, cluster=3.5, n_examples=8)
    with pytest.raises(ParameterError, match="n_workers must be a positive int"):
        dist.mine(tiny, sentences, cluster="local", n_workers=0, **MINE)
    with pytest.raises(ParameterError, match="torch_threads"):
        dist.mine(tiny, sentences, cluster="local", torch_threads=0, **MINE)
    with pytest.raises(ParameterError, match="cluster=None means no cluster"):
        dist.mine_trigger_examples_on_cluster(tiny, sentences, cluster=None, **MINE)
    started = time.perf_counter()
    with pytest.raises(ParameterError, match="Could not connect to the Dask scheduler at 'tcp://127.0.0.1:9'"):
        dist.mine(tiny, sentences, cluster="tcp://127.0.0.1:9", connect_timeout=1, **MINE)
    assert time.perf_counter() - started < 20


def test_cluster_none_runs_the_single_process_functions(tiny, sentences, monkeypatch):
    calls = []
    monkeypatch.setattr(keys, "mine_trigger_examples", lambda *a, **kw: calls.append(("mine", kw)) or "mined")
    monkeypatch.setattr(agg, "analyse_aggregation", lambda *a, **kw: calls.append(("agg", kw)) or "aggregated")
    assert dist.mine(tiny, sentences, cluster=None, n_workers=4, k=3) == "mined"
    assert dist.aggregate(tiny, cluster=None, n_examples=7) == "aggregated"
    assert calls == [("mine", {"k": 3}), ("agg", {"n_examples": 7})]


# ---- mining on the cluster ----------------------------------------------------------------------------
def test_mining_on_a_cluster_address_equals_the_single_process_result(mined, single, cluster):
    (result, out), (reference, ref_out) = mined, single
    info = result.stats["cluster"]
    assert info["shards"] >= 4 and sorted(info["computed_shards"]) == list(range(info["shards"]))
    assert info["address"] == cluster[0]
    _same_triggers(result, reference)
    # the saved Parquet files and snapshot states are byte-identical
    assert _parquet_checksums(out) == _parquet_checksums(ref_out)
    assert len([name for name in _parquet_checksums(out) if name.endswith(".state.json")]) == 2
    assert len({t["pid"] for t in info["shard_timings"]}) == 2  # both workers took shards
    # each worker process loaded the model once and kept it for all its shards
    stats = cluster[1].run(dist.worker_stats)
    assert all(s["loads"] == 1 for s in stats.values()), stats
    # this cluster's nanny set MALLOC_TRIM_THRESHOLD_ (Dask's default); each worker undid its cost
    assert all(s["malloc_trim_threshold"] and s["malloc_tuned"] for s in stats.values()), stats
    assert sum(s["shards"] for s in stats.values()) == info["shards"]


def test_snapshots_fall_on_shard_boundaries_and_equal_a_run_on_the_prefix(mined, single, tiny, sentences):
    (result, out), (reference, ref_out) = mined, single
    sizes = keys.snapshot_sizes(result)
    assert sizes == [30, 60, 120] and result.stats["snapshots"] == [30, 60]  # "auto": a quarter of 120
    lengths = [len(t) for t in result.sentences["token_ids"]]
    _, ends = batching.plan_prefix_batches(lengths, MINE["batch_tokens"], sizes)
    shard_ends = {t["end_batch"] for t in result.stats["cluster"]["shard_timings"]}
    assert set(ends) <= shard_ends  # no shard spans the end of a snapshot's prefix
    for size in sizes[:-1]:
        snapshot = keys.trigger_snapshot(result, size, out_dir=out)
        _same_triggers(snapshot, keys.trigger_snapshot(reference, size, out_dir=ref_out))
        alone = keys.mine_trigger_examples(tiny, sentences.iloc[:size], snapshot_floor=30, **MINE)
        _same_triggers(snapshot, alone)


def test_a_rerun_computes_only_the_missing_shards(mined, single, tiny, sentences, cluster):
    (result, out), (reference, _) = mined, single
    shard_folder = next(out.glob("triggers-*.shards"))
    n = result.stats["cluster"]["shards"]
    assert len(list(shard_folder.glob("shard-*.parquet"))) == n

    def lose_the_result():
        for path in out.glob("triggers-*"):
            if path.is_file():
                path.unlink()

    # an interrupted run: the merged result and two shards are missing
    lose_the_result()
    lost = [1, n - 1]
    for index in lost:
        for path in shard_folder.glob(f"shard-{index:05d}-*"):
            path.unlink()
    before = sum(s["shards"] for s in cluster[1].run(dist.worker_stats).values())
    rerun = dist.mine(tiny, sentences, cluster=cluster[0], shard_tokens=SHARD_TOKENS, keep_shards=True,
                      out_dir=out, **MINE)
    after = sum(s["shards"] for s in cluster[1].run(dist.worker_stats).values())
    assert sorted(rerun.stats["cluster"]["computed_shards"]) == lost
    assert after - before == len(lost)  # tasks the workers actually ran
    _same_triggers(rerun, reference)
    # every shard finished, only the merge missing: no worker is needed (this address has no scheduler)
    lose_the_result()
    merged = dist.mine(tiny, sentences, cluster="tcp://127.0.0.1:9", shard_tokens=SHARD_TOKENS, out_dir=out, **MINE)
    assert merged.stats["cluster"]["computed_shards"] == [] and merged.stats["cluster"]["cached_shards"] == n
    _same_triggers(merged, reference)
    assert not shard_folder.exists()  # keep_shards=False: removed once the result is saved
    cached = dist.mine(tiny, sentences, cluster=cluster[0], shard_tokens=SHARD_TOKENS, out_dir=out, **MINE)
    assert cached.stats["from_cache"] is True  # a finished result is loaded, whatever the cluster
    _same_triggers(cached, reference)


def test_a_worker_killed_in_the_middle_of_a_shard_changes_nothing(single, tiny, sentences, cluster, tmp_path):
    address, client = cluster
    (reference, _) = single
    (tmp_path / "armed").write_text("")
    client.run(dist.arm_pause, str(tmp_path))
    box = {}

    def run():
        try:
            box["result"] = dist.mine(tiny, sentences, cluster=address, shard_tokens=SHARD_TOKENS, **MINE)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    pid_file = tmp_path / "pid"
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid_file.exists(), "no shard paused"
    victim = int(pid_file.read_text())
    assert victim != os.getpid()
    os.kill(victim, signal.SIGKILL)
    thread.join(120)
    client.run(dist.arm_pause, "")
    assert not thread.is_alive()
    assert "error" not in box, box.get("error")
    result = box["result"]
    pids = {t["pid"] for t in result.stats["cluster"]["shard_timings"]}
    assert victim not in pids  # the paused shard was finished by another worker process
    _same_triggers(result, reference)
    client.wait_for_workers(2, timeout=60)  # the nanny restarted the killed worker


def test_a_model_the_workers_cannot_load_is_a_clear_error(tiny, sentences, cluster):
    from ffnlib.models import LoadedModel

    in_memory = LoadedModel("in-memory", tiny.model, tiny.tokenizer, tiny.adapter, "built in memory", "x", False,
                            list(tiny.bos))
    with pytest.raises(ParameterError, match="could not load the model 'built in memory'"):
        dist.mine(in_memory, sentences, cluster=cluster[0], shard_tokens=SHARD_TOKENS, **MINE)


def test_mining_the_real_smollm2_on_the_cluster(smollm, cluster):
    table = load_corpus("wiki", split="train", max_sentences=16)
    options = {"k": 3, "layers": [0, 29], "batch_tokens": 256, "progress": False}
    reference = keys.mine_trigger_examples(smollm, table, **options)
    result = dist.mine(smollm, table, cluster=cluster[0], shard_tokens=200, **options)
    assert result.stats["cluster"]["shards"] >= 2
    _same_triggers(result, reference)


# ---- aggregation ---------------------------------------------------------------------------------------
def test_aggregation_on_a_cluster_equals_the_single_process_result(tiny, cluster, tmp_path):
    options = {"n_examples": 40, "batch_tokens": 96, "value_cache": tmp_path / "values", "progress": False}
    reference = agg.analyse_aggregation(tiny, out_dir=tmp_path / "single", **options)
    result = dist.aggregate(tiny, cluster=cluster[0], shard_tokens=200, out_dir=tmp_path / "cluster", **options)
    info = result.info["cluster"]
    assert info["shards"] >= 3 and info["workers"] == 2
    pd.testing.assert_frame_equal(result.frame, reference.frame, check_exact=True)
    pd.testing.assert_frame_equal(result.examples, reference.examples, check_exact=True)
    assert result.manifest == reference.manifest
    checksums = [read_json(next((tmp_path / d).glob("aggregation-*.manifest.json")))["sha256"]
                 for d in ("single", "cluster")]
    assert checksums[0] == checksums[1]  # byte-identical Parquet files
    again = dist.aggregate(tiny, cluster=cluster[0], out_dir=tmp_path / "single", **options)
    assert again.cached  # the single-process result is reused by the cluster run (same name and manifest)
    assert np.array_equal(again.frame["n_active"], reference.frame["n_active"])


# ---- cluster="local" -------------------------------------------------------------------------------------
def test_local_starts_worker_processes_with_one_task_thread_and_closes_them(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    with dist.connect("local", n_workers=1, progress=False) as client:
        workers = client.scheduler_info()["workers"]
        assert len(workers) == 1 and [w["nthreads"] for w in workers.values()] == [1]
        stats = client.run(dist.worker_stats)
        assert os.getpid() not in [s["pid"] for s in stats.values()]  # processes, not threads of this one
        assert [s["malloc_trim_threshold"] for s in stats.values()] == [None]  # Dask's slow default is off
        cluster = client.cluster
        assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures) \
            == dist.ALLOWED_FAILURES
    assert cluster.status.name == "closed"
    # what the nanny wrote into this process's environment is undone (programs started later keep theirs)
    assert os.environ.get("OMP_NUM_THREADS") == "7" and "MALLOC_TRIM_THRESHOLD_" not in os.environ


def test_a_client_or_cluster_object_is_used_as_it_is(cluster):
    address, client = cluster
    with dist.connect(client, progress=False) as used:
        assert used is client
    with dist.connect(client.cluster, progress=False) as used:  # e.g. a dask_jobqueue.SLURMCluster
        assert used.scheduler.address == address
    assert client.cluster.status.name == "running"  # neither was closed
    assert client.status == "running"
