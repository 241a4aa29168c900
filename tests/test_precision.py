"""The ``precision`` parameter: which dtype is chosen and refused, what stays float32, exactness per dtype, and
that a bf16 result never answers a float32 request."""

from __future__ import annotations

import warnings

import pytest
import torch

from ffnlib import precision as prec
from ffnlib.capture import capture, decomposition_check, hook_coefficients
from ffnlib.errors import ParameterError
from ffnlib.keys import trigger_request
from ffnlib.models import load_model
from ffnlib.suite import preflight
from tiny_models import CASE_IDS, CASES, build_config

FAMILIES = ["llama", "opt", "gpt2", "gemma3_text", "gpt-neox-parallel"]


@pytest.fixture(scope="module")
def folders(smollm, tmp_path_factory):
    out = {}
    for case_id in FAMILIES:
        case = CASES[CASE_IDS.index(case_id)]
        torch.manual_seed(3)
        folder = tmp_path_factory.mktemp(case_id)
        case.model_cls(build_config(case, vocab=len(smollm.tokenizer), positions=64)).save_pretrained(folder)
        smollm.tokenizer.save_pretrained(folder)
        out[case_id] = str(folder)
    return out


def test_unknown_precision_and_float16_on_a_cpu_are_refused():
    with pytest.raises(ParameterError, match="Unknown precision 'fp8'.*float32, bfloat16, float16, auto"):
        prec.resolve_precision("fp8", "cpu")
    with pytest.raises(ParameterError, match="float16' runs on a GPU only"):
        prec.resolve_precision("float16", "cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_takes_bf16_only_where_the_hardware_has_it(native, monkeypatch):
    monkeypatch.setattr(prec, "native_bfloat16", lambda device="cpu": native)
    chosen = prec.resolve_precision("auto", "cpu")
    assert chosen.dtype == (torch.bfloat16 if native else torch.float32)
    assert ("has native bf16" if native else "has no native bf16") in chosen.reason
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert prec.resolve_precision("bfloat16", "cpu").dtype == torch.bfloat16  # asked for: it runs, and says
    assert bool(caught) is not native
    if caught:
        assert "emulates it" in str(caught[0].message) and "slower" in str(caught[0].message)


def test_the_cpu_flags_decide_native_bf16(monkeypatch):
    monkeypatch.setattr(prec.platform, "system", lambda: "Linux")
    monkeypatch.setattr(prec, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert prec.native_bfloat16("cpu")
    monkeypatch.setattr(prec, "cpu_flags", lambda: {"avx2", "fma"})
    assert not prec.native_bfloat16("cpu")


def test_the_command_line_checks_the_precision_before_the_first_kernel(tmp_path):
    with pytest.raises(ParameterError, match="float16' runs on a GPU only"):
        preflight("smollm2-135m", "ci", tmp_path / "r", ["01_keys"], "cpu", "none", "float16")
    with pytest.raises(ParameterError, match="Unknown precision"):
        preflight("smollm2-135m", "ci", tmp_path / "r", ["01_keys"], "cpu", "none", "half")


def test_a_run_in_another_precision_has_its_own_folder():
    assert prec.run_folder_name("default") == "default"  # float32 runs keep the folders they always had
    assert prec.run_folder_name("ci", "bfloat16") == "ci-bfloat16"


@pytest.mark.parametrize("case_id", FAMILIES)
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_sum_of_memories_equals_the_ffn_output_within_the_dtypes_tolerance(case_id, precision, folders):
    """Σ m_i·v_i = FF(x) and the adapter's logits = the model's, in both dtypes, with each dtype's tolerance; in
    bf16 the error is also larger than float32's would allow (so the check is a real one, not a float32 run)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 emulated on this CPU
        loaded = load_model(folders[case_id], precision=precision)
    assert loaded.precision == precision and next(loaded.model.parameters()).dtype == getattr(torch, precision)
    check = decomposition_check(loaded, "The capital of France is Paris, and the capital of Italy is Rome.")
    tol = prec.tolerance(precision)
    assert check.relative_error.max() < tol.relative
    assert check.attrs["logits_max_abs_error"] < tol.logits
    if precision == "bfloat16":
        assert check.relative_error.max() > prec.tolerance("float32").relative


def test_captured_tensors_weights_and_logits_are_float32_in_a_bf16_model(folders):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_model(folders["llama"], precision="bfloat16")
    adapter = loaded.adapter
    ids = torch.tensor([loaded.encode("The capital of France is")])
    with capture(loaded, [0, 1], what=("coefficients", "ffn_output", "residual_before")) as acts:
        loaded.model(ids)
    assert {t.dtype for d in (acts.coefficients, acts.ffn_output, acts.residual_before) for t in d.values()} \
        == {torch.float32}
    assert {adapter.keys(0).dtype, adapter.values(0).dtype, adapter.norm_gain().dtype} == {torch.float32}
    assert adapter.logits_from_values(adapter.values(1)[:3]).dtype == torch.float32
    assert adapter.logits_from_residual(acts.residual_before[1]).dtype == torch.float32

    seen = {}

    def double(layer, m):  # an edit made on the float32 view reaches the bf16 module
        seen[layer] = m.dtype
        return 2 * m

    with torch.no_grad():
        plain = loaded.model(ids).logits
        with hook_coefficients(loaded, 1, double):
            doubled = loaded.model(ids).logits
    assert seen == {1: torch.float32} and doubled.dtype == torch.bfloat16
    assert not torch.equal(plain, doubled)


def test_a_bf16_result_never_answers_a_float32_request(folders, wiki):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f32, bf16 = (load_model(folders["opt"], precision=p) for p in ("float32", "bfloat16"))
    assert f32.key == f32.name and bf16.key == f"{bf16.name}@bfloat16"
    sentences = wiki.head(12)
    a, b = (trigger_request(m, sentences, 4, "max", None, None, 2048, 1000, None) for m in (f32, bf16))
    assert a.name != b.name and a.request["model"] != b.request["model"]


def test_a_value_edit_reaches_a_bf16_model_and_is_undone_bit_for_bit(folders):
    """Edits write through ``Adapter.value_rows`` (a view in the model's dtype), not ``values`` (a float32 copy in a
    bf16 model, where a write would silently change nothing)."""
    from ffnlib.related.knowledge_neurons import edited_values

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_model(folders["gpt2"], precision="bfloat16")  # Conv1D: the transposed orientation
    weight = loaded.adapter.down(1).weight
    before = weight.detach().clone()
    assert loaded.adapter.value_rows(1).data_ptr() == weight.data_ptr()
    ids = torch.tensor([loaded.encode("The capital of France is")])
    with torch.no_grad():
        plain = loaded.model(ids).logits
        with edited_values(loaded, {(1, 3): 50 * torch.ones(loaded.adapter.d_model)}):
            assert torch.equal(loaded.adapter.values(1)[3], torch.full((loaded.adapter.d_model,), 50.0))
            edited = loaded.model(ids).logits
    assert not torch.equal(plain, edited)
    assert torch.equal(weight, before)
