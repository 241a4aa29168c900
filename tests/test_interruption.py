"""Interruption: SIGKILL at five or more points of each long step, then run it again.

Each step runs in its own process group with the fault hooks of ``tests/faults/sitecustomize.py``:
the whole group is killed at a chosen write (half a temporary file left behind, or a data file
without its manifest), and every finished write is logged. After each kill the step runs again;
at the end:

- the final Parquet results equal, row for row and byte for byte, those of an uninterrupted run;
- nothing started over: a checkpoint or result, once finished, is never written again
  (so each rerun resumed from the last checkpoint before the kill).

Mining has its own SIGKILL test in test_mining.py (kills at batch boundaries and inside checkpoints); in the whole
suite below, at scale ci, mining saves its corpus-size snapshots and no checkpoint (fewer sentences than
``checkpoint_every`` after the last snapshot), so it is killed while saving a snapshot and resumes from the one before.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
import transformers as tf

import ffnlib
from ffnlib import storage
from ffnlib.models import load_model
from ffnlib.storage import read_json
from ffnlib.values import project_values

ROOT = Path(__file__).resolve().parents[1]
FAULTS = Path(__file__).resolve().parent / "faults"


@pytest.fixture(scope="module")
def model_dir(smollm, tmp_path_factory) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer, saved as a local model folder (6 layers)."""
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(smollm.tokenizer), hidden_size=16, intermediate_size=24,
                            num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1,
                            max_position_embeddings=512, tie_word_embeddings=True,
                            bos_token_id=smollm.tokenizer.bos_token_id, eos_token_id=smollm.tokenizer.eos_token_id)
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    folder = tmp_path_factory.mktemp("tiny-model") / "tiny-llama"
    model.save_pretrained(folder)
    smollm.tokenizer.save_pretrained(folder)
    return folder


def run(args: list[str], log: Path, kill: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``args`` in a new process group with the fault hooks (kill at ``kill``, log every write)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FAULTS), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "FFNLIB_WRITE_LOG": str(log), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.pop("FFNLIB_KILL", None)
    if kill:
        env["FFNLIB_KILL"] = kill
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, start_new_session=True)


def written(log: Path) -> list[str]:
    return [line.split(" ", 1)[1] for line in log.read_text().splitlines()] if log.exists() else []


def results(folder: Path) -> dict[str, bytes]:
    """Every finished Parquet result under ``folder`` (checkpoint folders excluded), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.parquet"))
            if ".partial" not in str(p) and "checkpoint" not in p.name}


def assert_same_results(reference: Path, resumed: Path) -> None:
    ref, res = results(reference), results(resumed)
    assert ref and sorted(ref) == sorted(res)
    for name in ref:
        pd.testing.assert_frame_equal(pd.read_parquet(reference / name), pd.read_parquet(resumed / name))
        assert ref[name] == res[name], name


def assert_never_redone(paths: list[str], pattern: str) -> None:
    """Finished checkpoints and results (their manifests) are written once over all runs, never again."""
    counts = Counter(p for p in paths if re.search(pattern, p))
    assert counts, f"no write matched {pattern}"
    redone = {p: n for p, n in counts.items() if n > 1}
    assert not redone, f"recomputed after it was finished: {redone}"


def kill_and_resume(command: list[str], out: Path, kills: list[str], log: Path) -> list[str]:
    """Run ``command`` once per kill point (each must die by SIGKILL), then once to the end."""
    outputs = []
    for kill in kills:
        p = run(command, log, kill)
        assert p.returncode == -signal.SIGKILL, (kill, p.returncode, p.stdout[-2000:], p.stderr[-4000:])
        outputs.append(p.stdout + p.stderr)
    p = run(command, log)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-4000:])
    assert not list(out.rglob("*.partial")), "checkpoints are removed once the result is saved"
    return outputs + [p.stdout + p.stderr]


STEP = textwrap.dedent("""
    import sys
    import torch
    torch.set_num_threads(1)
    from ffnlib.models import load_model
    step, model_dir, out = sys.argv[1:4]
    loaded = load_model(model_dir)
    if step == "values":
        from ffnlib.values import project_values
        project_values(loaded, top_k=5, out_dir=out, progress=False)
    else:
        from ffnlib.aggregation import analyse_aggregation
        result = analyse_aggregation(loaded, n_examples=40, batch_tokens=48, out_dir=out,
                                     value_cache=out + "/value-cache", progress=True)
        print("BATCHES", result.info.get("batches"))
    print("DONE")
""")


@pytest.fixture(scope="module")
def step_script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scripts") / "step.py"
    path.write_text(STEP)
    return path


def test_value_projection_killed_at_six_points(model_dir, step_script, tmp_path):
    command = [sys.executable, str(step_script), "values", str(model_dir)]
    ref = run(command + [str(tmp_path / "ref")], tmp_path / "ref.log")
    assert ref.returncode == 0, ref.stderr[-4000:]
    # Each layer is a checkpoint of four writes (tokens: parquet, manifest; memories: parquet, manifest);
    # the run counts its own writes, so a rerun's numbers start from its first unfinished layer.
    kills = ["layer-001.manifest.json@1",        # layer 0 finished, layer 1 nearly: its memories manifest
             "layer-002.tokens.parquet@1~half",  # half a temporary file of layer 2
             "layer-002.parquet@1",              # layer 2's tokens finished, its memories not
             "layer-004.tokens.manifest.json@1",
             "layer-005.parquet@1~half",         # the last layer
             "values-*.manifest.json@1"]         # every layer done, the final result half saved
    out = tmp_path / "run"
    outputs = kill_and_resume(command + [str(out)], out, kills, tmp_path / "run.log")
    assert "Resumed: 6 of 6 layers" in outputs[-1]  # the last run only saved the result
    assert_same_results(tmp_path / "ref", out)
    assert_never_redone(written(tmp_path / "run.log"), r"layer-\d+\.manifest\.json$")
    assert_never_redone(written(tmp_path / "run.log"), r"/values-[0-9a-f]+\.manifest\.json$")


def test_aggregation_killed_at_six_points(model_dir, step_script, tmp_path):
    command = [sys.executable, str(step_script), "aggregation", str(model_dir)]
    ref = run(command + [str(tmp_path / "ref")], tmp_path / "ref.log")
    assert ref.returncode == 0, ref.stderr[-4000:]
    batches = int(re.search(r"BATCHES (\d+)", ref.stdout).group(1))
    assert batches >= 10, batches
    kills = ["value-tops-*.manifest.json@1",          # while caching the values' top tokens
             "batch-00002.manifest.json@1",            # batch 2's data written, its manifest not
             "batch-00003.parquet@1~half",
             f"batch-{batches // 2:05d}.parquet@1",
             f"batch-{batches - 1:05d}.manifest.json@1",  # the last batch
             "aggregation-*.parquet@1~half"]           # every batch done, the final result half written
    out = tmp_path / "run"
    outputs = kill_and_resume(command + [str(out)], out, kills, tmp_path / "run.log")
    assert f"resumed: {batches} of {batches} batches" in outputs[-1]
    assert_same_results(tmp_path / "ref", out)
    assert_never_redone(written(tmp_path / "run.log"), r"batch-\d+\.manifest\.json$")
    assert_never_redone(written(tmp_path / "run.log"), r"/aggregation-[0-9a-f]+\.manifest\.json$")


def test_the_whole_suite_killed_at_three_points(model_dir, tmp_path):
    """``python -m ffnlib.suite`` at scale ci on the tiny model, killed inside notebook 01's mining, after notebook
    03's result was saved (while its figures are written) and in the report; every later notebook, and the
    completed steps of 02 and 03, are then found and not redone. The kills inside 02's projection and 03's batches
    are the step tests' above (six points each). Without the random-weights control: it runs the same functions on
    another model (twice the time, nothing new to resume)."""
    command = [sys.executable, "-m", "ffnlib.suite", "--model", str(model_dir), "--scale", "ci", "--control", "none",
               "--notebooks", "01_keys", "02_values", "03_aggregation", "04_compare_models"]
    ref = run(command + ["--results", str(tmp_path / "ref")], tmp_path / "ref.log", timeout=600)
    assert ref.returncode == 0, ref.stderr[-4000:]
    kills = ["*.state.json@2",               # mining (01), between its second snapshot's data and JSON
             "03_fig8_*.png@1~half",          # 03's figures, after its result was saved
             "report.md@1"]                   # the report, after every notebook finished
    out = tmp_path / "run"
    outputs = kill_and_resume(command + ["--results", str(out)], out, kills, tmp_path / "run.log")
    assert_same_results(tmp_path / "ref", out)
    log = written(tmp_path / "run.log")
    assert_never_redone(log, r"layer-\d+\.manifest\.json$")
    assert_never_redone(log, r"batch-\d+\.manifest\.json$")
    assert_never_redone(log, r"/(triggers|values|aggregation)-[0-9a-f]+\.manifest\.json$")
    assert_never_redone(log, r"/removal-[0-9a-f]+\.manifest\.json$")
    assert_never_redone(log, r"/triggers-[0-9a-f]+\.state\.json$")  # the snapshots (the second after its kill)
    states = [{str(p.relative_to(folder)): read_json(p)["sha256"] for p in folder.rglob("*.state.json")}
              for folder in (tmp_path / "ref", out)]
    assert states[0] and states[0] == states[1]
    assert "## " in next(out.rglob("report.md")).read_text()
    assert not list(out.rglob(".*.running.ipynb"))  # every executed notebook was renamed into place


def test_a_full_disk_in_the_middle_of_a_step_loses_nothing(model_dir, tmp_path, monkeypatch, capsys):
    """The disk fills while layer 2's checkpoint is written: a clear ResultsError, layers 0 and 1 kept,
    no temporary file left; once there is room again the rerun resumes and ends identical."""
    loaded = load_model(str(model_dir))
    reference = project_values(loaded, top_k=5, progress=False)
    real_fsync, state = storage.os.fsync, {"writes": 0}

    def fsync(fd):
        state["writes"] += 1
        if state["writes"] == 9:  # four writes per layer: the first write of layer 2
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(storage.os, "fsync", fsync)
    with pytest.raises(ffnlib.ResultsError, match=r"disk is full: could not write .*layer-002\.tokens\.parquet"):
        project_values(loaded, top_k=5, out_dir=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.rglob("layer-*.manifest.json")) == [
        "layer-000.manifest.json", "layer-000.tokens.manifest.json",
        "layer-001.manifest.json", "layer-001.tokens.manifest.json"]
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")], "no half-written file is left"
    monkeypatch.setattr(storage.os, "fsync", real_fsync)
    capsys.readouterr()
    resumed = project_values(loaded, top_k=5, out_dir=tmp_path, progress=False)
    assert "Resumed: 2 of 6 layers" in capsys.readouterr().out
    pd.testing.assert_frame_equal(resumed.memories, reference.memories)
    pd.testing.assert_frame_equal(resumed.tokens, reference.tokens)
